"""Chat rendering with tools: the tokenizer's chat template when it renders tools itself, else the
Hermes convention (Qwen 2.5's): tool signatures in the system prompt inside <tools></tools>,
assistant calls as <tool_call>{"name", "arguments"}</tool_call>, results as <tool_response> turns.

Messages use OpenAI's shape (assistant `tool_calls` with `function.arguments` as a JSON string,
`tool` messages with `tool_call_id`); the server and the trainer render through here, so an adapter
trained on tool-call chats sees the same text it is served.
"""

from __future__ import annotations

import json
from typing import Any

HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "probe_tool", "parameters": {"type": "object", "properties": {}}},
}
_native_tools: dict[str, bool] = {}  # chat template text -> whether it renders tools itself


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools=` list (probed once per template)."""
    template = tokenizer.chat_template or ""
    if template not in _native_tools:
        probe = [{"role": "user", "content": "x"}]
        plain = tokenizer.apply_chat_template(probe, tokenize=False)
        with_tools = tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL], tokenize=False)
        _native_tools[template] = plain != with_tools
    return _native_tools[template]


def call_arguments(call: dict[str, Any]) -> Any:
    """A tool call's arguments as a value (OpenAI sends them as a JSON string; text that is not
    JSON is kept as the string the model is shown)."""
    arguments = call["function"].get("arguments") or "{}"
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def hermes_call(name: str, arguments: Any) -> str:
    """One call in the Hermes format."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as HF templates expect them: tool-call arguments as mappings."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": call_arguments(call)}}
                for call in message["tool_calls"]
            ]
        out.append(message)
    return out


def _hermes_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """OpenAI messages with tools as plain system/user/assistant turns in the Hermes format."""
    out: list[dict[str, str]] = []
    after_tool = False  # consecutive tool results share one user turn
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            after_tool = True
            continue
        after_tool = False
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                hermes_call(call["function"]["name"], call_arguments(call))
                for call in message["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        prompt = HERMES_TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The conversation (and tools) as the text the model reads."""
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and not renders_tools(tokenizer):
        messages, tools = _hermes_messages(messages, tools), None
    elif uses_tools:
        messages = _native_messages(messages)
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False
    )

"""The model's own tool-call text -> OpenAI tool calls, whole or while streaming (--tool-call-parser).

- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks anywhere in the
  output, text around them is content (Qwen 2.5/3, SmolLM3, Hermes; loader/chat.py's fallback).
- llama3_json: the whole output is one or more `{"name": ..., "parameters": {...}}` objects
  separated by `;`, optionally after `<|python_tag|>` (Llama 3.1/3.2); otherwise it is content.
A block that does not parse as a call stays in the content, as the model wrote it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr
from xgrammar.structural_tag import TagsWithSeparatorFormat, TriggeredTagsFormat

from server.errors import APIError
from server.schemas import ChatCompletionRequest
from server.structured import GrammarSpec, check_schema


@dataclass
class ToolCall:
    """One parsed call: OpenAI's id, function name and arguments as a JSON string."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool_call object (with `index` in stream deltas)."""
        body: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return body if index is None else {"index": index, **body}


def _call(obj: object, arguments_key: str) -> ToolCall | None:
    """A ToolCall from a decoded {"name", arguments_key} object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
HERMES_OPEN = "<tool_call>"


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an output with Hermes <tool_call> blocks."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in HERMES_BLOCK.finditer(text):
        try:
            call = _call(json.loads(match.group(1)), "arguments")
        except json.JSONDecodeError:
            call = None
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return content or None, calls


PYTHON_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a Llama 3 output: calls only if the whole output is calls."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    position = 0
    while body and position < len(body):
        try:
            obj, position = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return text or None, []
        call = _call(obj, "parameters")
        if call is None:
            return text or None, []
        calls.append(call)
        while position < len(body) and body[position] in " \t\r\n;":
            position += 1
    return (None, calls) if calls else (text or None, [])


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output in the named format."""
    return PARSERS[parser](text)


class ToolCallStream:
    """Splits a streamed output into content deltas and complete tool calls as they close.

    Content is passed on as soon as it cannot be the start of a call; a call is emitted whole
    (name and all its arguments in one delta) once its text is complete.
    """

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.pending = ""  # text held back: a possible call start, or a call being written
        self.started = False  # llama3_json: the first non-space character was seen
        self.is_call = False  # llama3_json: and it opens a call
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content that can be released and the calls completed by this text."""
        self.pending += text
        if self.parser == "llama3_json":
            return self._feed_llama3()
        return self._feed_hermes(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Everything still held back, at the end of the output."""
        if self.parser == "llama3_json":
            content, calls = parse_llama3_json(self.pending) if self.pending else (None, [])
            self.pending = ""
            self.calls += calls
            return content or "", calls
        return self._feed_hermes(final=True)

    def _feed_llama3(self) -> tuple[str, list[ToolCall]]:
        if not self.started:
            stripped = self.pending.lstrip()
            if not stripped:
                return "", []
            self.started = True
            self.is_call = stripped[0] == "{" or PYTHON_TAG.startswith(stripped[:14])
        if self.is_call:
            return "", []  # a call (or calls) up to the end: parsed by finish()
        text, self.pending = self.pending, ""
        return text, []

    def _feed_hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        while self.pending:
            start = self.pending.find(HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.pending, HERMES_OPEN)
                content.append(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                break
            content.append(self.pending[:start])
            self.pending = self.pending[start:]
            end = self.pending.find("</tool_call>")
            if end < 0 and not final:
                break  # the call is still being written
            block = self.pending if end < 0 else self.pending[: end + len("</tool_call>")]
            self.pending = self.pending[len(block) :]
            text, found = parse_hermes(block)
            if found:
                calls += found
            else:
                content.append(block)
        self.calls += calls
        return "".join(content), calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


# tool_choice -> what decoding and parsing do ---------------------------------------------------
STRUCTURAL_TAG_MODELS = {"hermes": "qwen_3", "llama3_json": "llama"}  # xgrammar's format names
MAX_WHITESPACE = 2  # per run inside forced arguments: a sampled model cannot pad them forever


@dataclass
class ToolUse:
    """How a chat request uses its tools: the parser that reads calls from the output (None:
    no calls are parsed) and the grammar forcing a call (required or a named function)."""

    tools: list[dict[str, Any]]
    parser: str | None = None
    grammar: GrammarSpec | None = None


def forced_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools a forced call is generated under: one per function name (a name defined twice
    takes arguments valid under either definition), strict (strict: false would make xgrammar
    leave the arguments unconstrained; they always follow their schema here)."""
    merged: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool["function"]
        seen = merged.get(function["name"])
        if seen is None:
            merged[function["name"]] = {**tool, "function": {**function, "strict": True}}
        elif "parameters" not in function:  # any arguments
            seen["function"].pop("parameters", None)
        elif "parameters" in seen["function"]:
            either = [seen["function"]["parameters"], function["parameters"]]
            seen["function"]["parameters"] = {"anyOf": either}
    return list(merged.values())


def tool_use(req: ChatCompletionRequest, parser: str) -> ToolUse:
    """Validate tools and tool_choice (400 naming the parameter) and resolve them."""
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError("tool_choice needs tools", 400, "invalid_value", "tool_choice")
    if choice == "none":
        return ToolUse(tools)
    if choice == "auto":
        return ToolUse(tools, parser)
    if isinstance(choice, str):  # required
        forced: str | dict[str, Any] = "required"
    else:
        name = choice.function.name
        if name not in {tool["function"]["name"] for tool in tools}:
            raise APIError(
                f"tool_choice names {name!r}, which is not in tools",
                400,
                "unknown_tool",
                "tool_choice",
            )
        forced = {"type": "function", "function": {"name": name}}
    for tool in tools:  # the arguments of a forced call are generated under these schemas
        if "parameters" in tool["function"]:
            check_schema(tool["function"]["parameters"], "tools")
    try:
        tag = xgr.get_model_structural_tag(
            STRUCTURAL_TAG_MODELS[parser],
            tools=forced_tools(tools),
            tool_choice=forced,
            reasoning="disabled",
            max_whitespace_cnt=MAX_WHITESPACE,
            parallel_tool_calls=req.parallel_tool_calls is not False,
        )
    except ValueError as error:
        raise APIError(
            f"tools cannot be forced: {error}", 400, "invalid_grammar", "tools"
        ) from None
    if isinstance(tag.format, TriggeredTagsFormat):  # required: calls only, no text around them
        fmt = tag.format
        tag.format = TagsWithSeparatorFormat(
            tags=fmt.tags, separator="\n", at_least_one=True, stop_after_first=fmt.stop_after_first
        )
    return ToolUse(tools, parser, GrammarSpec("structural_tag", tag.model_dump_json(), "tools"))

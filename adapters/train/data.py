"""Training data: JSONL in chat, prompt/completion or plain-text form, tokenized with loss masks.

Forms, one JSON object per line:
- {"messages": [{"role", "content"}, ...], "tools"?: [...]}: rendered by loader.chat.render_chat
  (the base's chat template; with tools, the template's own tool format when it has one, else
  Hermes <tool_call> blocks); loss on assistant turns only, their tool calls included (tool
  results and the tools prompt are context). OpenAI's shapes: `tools` is a list of
  {"type": "function", "function": {"name", "description"?, "parameters"?}}; an assistant message
  may carry `tool_calls` [{"id", "type": "function", "function": {"name", "arguments": JSON string
  of an object}}] with `content` missing or null; a `tool` message has a string `content` and the
  `tool_call_id` of an earlier call.
- {"prompt": str, "completion": str}: raw text; loss on the completion (plus end of sequence) only.
- {"text": str}: raw text; loss on every token (plus end of sequence).
Bad lines are collected with their line numbers; blank lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from loader.chat import render_chat

log = logging.getLogger("loraplex.train")

IGNORE = -100
OVERLONG = ("truncate", "drop")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """The training data cannot be used (missing, empty, or no valid example)."""


@dataclass
class Example:
    """One tokenized example; labels[i] is input_ids[i] where it carries loss, else IGNORE."""

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def targets(self) -> int:
        """Number of predicted tokens (labels after the first position that carry loss)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class Dataset:
    """The usable examples of one JSONL file plus what was skipped and why."""

    path: Path
    sha256: str
    examples: list[Example]
    invalid: list[tuple[int, str]] = field(default_factory=list)
    forms: Counter = field(default_factory=Counter)
    truncated: int = 0
    dropped: int = 0

    def summary(self) -> dict:
        """Counts for the manifest."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "examples": len(self.examples),
            "forms": dict(self.forms),
            "invalid_lines": len(self.invalid),
            "truncated": self.truncated,
            "dropped_overlong": self.dropped,
        }


def _check_tools(tools: object) -> None:
    """A record's optional `tools`: OpenAI function tools; raises ValueError naming the problem."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ValueError("'tools' must be a list of function tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f'tool {i} must be an object with "type": "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"tool {i} needs a 'function' object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool {i} needs a non-empty string 'function.name'")
        if name in names:
            raise ValueError(f"tool {i}: function name {name!r} is listed twice")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise ValueError(f"tool {i} ({name}): 'description' must be a string")
        if not isinstance(function.get("parameters", {}), dict):
            raise ValueError(f"tool {i} ({name}): 'parameters' must be a JSON schema object")


def _check_call(i: int, j: int, call: object) -> str:
    """Tool call j of message i; returns its id, raises ValueError naming the problem."""
    where = f"message {i} tool call {j}"
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object")
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise ValueError(f"{where} needs a non-empty string 'id'")
    if call.get("type", "function") != "function":
        raise ValueError(f'{where}: "type" must be "function"')
    function = call.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where} needs a 'function' object")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where} needs a non-empty string 'function.name'")
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        raise ValueError(f"{where}: 'function.arguments' must be a JSON string")
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: 'function.arguments' is not valid JSON ({error.msg})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}: 'function.arguments' must encode a JSON object")
    return call["id"]


def _check_message(i: int, m: object, call_ids: set[str]) -> None:
    """Message i of a chat; call_ids collects the tool-call ids seen so far."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ValueError(f"message {i} needs a 'role' in {ROLES}")
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant":
            raise ValueError(f"message {i}: only assistant messages may have 'tool_calls'")
        if not isinstance(calls, list) or not calls:
            raise ValueError(f"message {i}: 'tool_calls' must be a non-empty list")
        call_ids.update(_check_call(i, j, call) for j, call in enumerate(calls))
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise ValueError(f"message {i}: 'content' must be a string or null")
        return
    if not isinstance(m.get("content"), str):
        raise ValueError(f"message {i} needs a string 'content'")
    if m["role"] == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"message {i} (tool result) needs a string 'tool_call_id'")
        if call_id not in call_ids:
            raise ValueError(
                f"message {i}: tool_call_id {call_id!r} matches no earlier assistant tool call"
            )


def _form(record: object) -> str:
    """Which of the three forms record is; raises ValueError naming the problem."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    forms = [
        name
        for name, keys in (("messages", {"messages"}), ("prompt", {"prompt", "completion"}))
        if keys & record.keys()
    ] + (["text"] if "text" in record else [])
    if len(forms) != 1:
        raise ValueError(
            "needs exactly one of 'messages', 'prompt'/'completion' or 'text'"
            + (f"; found {forms}" if forms else "")
        )
    form = forms[0]
    if "tools" in record and form != "messages":
        raise ValueError("'tools' only applies to the 'messages' form")
    if form == "messages":
        _check_tools(record.get("tools"))
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        call_ids: set[str] = set()
        for i, m in enumerate(messages):
            _check_message(i, m, call_ids)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message to learn from")
    elif form == "prompt":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"'{key}' must be a string")
        if not record["completion"]:
            raise ValueError("'completion' is empty")
    elif not isinstance(record["text"], str) or not record["text"].strip():
        raise ValueError("'text' must be a non-empty string")
    return form


def _chat_ids(
    tok: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None, generation: bool
) -> list[int]:
    """Token ids of a chat as served: render_chat's text, tokenized without added specials (what
    apply_chat_template(tokenize=True) does, so plain chats get the same ids)."""
    text = render_chat(tok, messages, tools, add_generation_prompt=generation)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _turn_end(ids: list[int], start: int, stop: int, eos: int | None) -> int:
    """End of an assistant span: just after its last end-of-turn token, else stop."""
    for i in range(stop - 1, start - 1, -1):
        if ids[i] == eos:
            return i + 1
    return stop


def tokenize(record: dict, form: str, tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE outside the trained spans) of one validated record."""
    eos = tok.eos_token_id
    if form == "text":
        ids = tok(record["text"])["input_ids"] + [eos]
        return ids, list(ids)
    if form == "prompt":
        prompt = tok(record["prompt"])["input_ids"]
        completion = tok(record["completion"], add_special_tokens=False)["input_ids"] + [eos]
        return prompt + completion, [IGNORE] * len(prompt) + completion
    messages, tools = record["messages"], record.get("tools") or None
    ids = _chat_ids(tok, messages, tools, generation=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_ids(tok, messages[:i], tools, generation=True)
        through = _chat_ids(tok, messages[: i + 1], tools, generation=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise ValueError("the chat template does not render turns as stable prefixes")
        end = _turn_end(through, len(before), len(through), eos)
        labels[len(before) : end] = through[len(before) : end]
    return ids, labels


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_dataset(
    path: Path,
    tok: PreTrainedTokenizerBase,
    max_len: int,
    overlong: str = "truncate",
    strict: bool = False,
) -> Dataset:
    """Parse, validate and tokenize a JSONL file; bad lines are reported (or fatal when strict)."""
    if overlong not in OVERLONG:
        raise DataError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if not path.is_file():
        raise DataError(f"training data not found: {path}")
    data = Dataset(path=path, sha256=file_sha256(path), examples=[])
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                form = _form(record)
                ids, labels = tokenize(record, form, tok)
            except json.JSONDecodeError as error:
                data.invalid.append((number, f"invalid JSON: {error.msg} (column {error.colno})"))
                continue
            except ValueError as error:
                data.invalid.append((number, str(error)))
                continue
            if len(ids) > max_len:
                if overlong == "drop":
                    data.dropped += 1
                    continue
                ids, labels = ids[:max_len], labels[:max_len]
                data.truncated += 1
            example = Example(ids, labels, number)
            if example.targets == 0:
                data.dropped += 1
                continue
            data.forms[form] += 1
            data.examples.append(example)
    _report(data, max_len, strict)
    return data


def _report(data: Dataset, max_len: int, strict: bool) -> None:
    """Log what was skipped; raise DataError when nothing is usable (or anything is, if strict)."""
    for number, reason in data.invalid[:20]:
        log.warning("%s line %d: %s", data.path, number, reason)
    if len(data.invalid) > 20:
        log.warning("%s: %d more invalid lines not shown", data.path, len(data.invalid) - 20)
    if data.truncated or data.dropped:
        log.info(
            "%d examples truncated to max_len=%d, %d dropped (over max_len or no tokens to learn)",
            data.truncated,
            max_len,
            data.dropped,
        )
    if strict and data.invalid:
        lines = ", ".join(str(n) for n, _ in data.invalid[:20])
        raise DataError(f"{data.path}: {len(data.invalid)} invalid lines (lines {lines})")
    if not data.examples:
        if not data.invalid and not data.dropped:
            raise DataError(f"{data.path} holds no examples (empty file)")
        first = "; ".join(f"line {n}: {r}" for n, r in data.invalid[:3])
        raise DataError(
            f"{data.path} has no usable example: {len(data.invalid)} invalid lines, "
            f"{data.dropped} dropped as too long for max_len={max_len}"
            + (f" ({first})" if first else "")
        )


def split(
    examples: list[Example], eval_split: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): eval_split < 1 is a fraction, >= 1 a count; the choice depends only on seed."""
    if eval_split < 0:
        raise DataError(f"eval split must be >= 0, got {eval_split}")
    n = len(examples)
    count = int(eval_split) if eval_split >= 1 else round(n * eval_split)
    if eval_split > 0 and n >= 2:
        count = max(count, 1)
    count = min(count, n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels, each [B, L] with L the longest example."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

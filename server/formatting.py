"""Choice deltas -> OpenAI response bodies and stream chunks, for completions and chat completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from server.generation import ChoiceDelta, TokenLogprob
from server.tool_calls import ToolCall, ToolCallStream, parse_tool_calls


def vllm_prompt_logprobs(entries: list[TokenLogprob] | None) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: per prompt token (None for the first) its own entry and its top
    alternatives', keyed by token id."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        own = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token}}
        top = {
            str(tid): {"logprob": lp, "rank": rank, "decoded_token": text}
            for rank, (tid, text, lp) in enumerate(e.top, 1)
        }
        out.append(top | own)
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object (cached_tokens: prompt tokens whose KV came from the prefix cache)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseFormat:
    """Shared state of one response: id, timestamps, per-choice accumulated text and logprobs."""

    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model: str, num_choices: int, logprobs: bool, stream_usage: bool) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self.stream_usage = stream_usage
        self.texts = [""] * num_choices
        self.token_logprobs: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]
        self.finish_reasons: list[str | None] = [None] * num_choices
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * num_choices

    def add(self, delta: ChoiceDelta) -> None:
        """Accumulate a delta for the final (non-streamed) response."""
        self.texts[delta.index] += delta.text
        self.token_logprobs[delta.index] += delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reasons[delta.index] = delta.finish_reason
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[delta.index] = delta.prompt_logprobs

    def _envelope(self, choices: list[dict[str, Any]], obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def chunk(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        """The stream chunk of a delta, or None when it carries nothing."""
        choice = self._chunk_choice(delta)
        if choice is None:
            return None
        body = self._envelope([choice], self.chunk_object)
        if self.stream_usage:
            body["usage"] = None
        return body

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chunks sent before any text (the chat role announcement)."""
        return []

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        """The last chunk of a stream with include_usage: no choices, the usage."""
        body = self._envelope([], self.chunk_object)
        body["usage"] = used
        return body

    def response(self, used: dict[str, int]) -> dict[str, Any]:
        """The whole non-streamed response."""
        choices = [self._final_choice(i) for i in range(len(self.texts))]
        body = self._envelope(choices, self.object_name)
        body["usage"] = used
        return body

    def _chunk_choice(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        raise NotImplementedError

    def _final_choice(self, index: int) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    """/v1/completions: `text` choices with legacy logprobs (tokens, token_logprobs, ...)."""

    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model: str, num_choices: int, logprobs: bool, stream_usage: bool) -> None:
        super().__init__(model, num_choices, logprobs, stream_usage)
        self.offsets = [0] * num_choices

    def _legacy_logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        text_offset = []
        for entry in entries:
            text_offset.append(self.offsets[index])
            self.offsets[index] += len(entry.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                None if e.logprob is None else {text: lp for _, text, lp in e.top} for e in entries
            ],
            "text_offset": text_offset,
        }

    def _chunk_choice(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        empty = not delta.text and not delta.logprobs and delta.prompt_logprobs is None
        if empty and delta.finish_reason is None:
            return None
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": self._legacy_logprobs(delta.index, delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        if delta.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(delta.prompt_logprobs)
        return choice

    def _final_choice(self, index: int) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": self.texts[index],
            "logprobs": self._legacy_logprobs(index, self.token_logprobs[index]),
            "finish_reason": self.finish_reasons[index],
        }
        if self.prompt_logprobs[index] is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(self.prompt_logprobs[index])
        return choice


def _chat_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class ChatFormat(ResponseFormat):
    """/v1/chat/completions: assistant messages (deltas when streamed) with chat logprobs; with a
    tool-call parser, calls in the output become `tool_calls` (finish_reason `tool_calls`)."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(
        self,
        model: str,
        num_choices: int,
        logprobs: bool,
        stream_usage: bool,
        tool_parser: str | None = None,
    ) -> None:
        super().__init__(model, num_choices, logprobs, stream_usage)
        self.tool_parser = tool_parser
        self.tool_streams = (
            [ToolCallStream(tool_parser) for _ in range(num_choices)] if tool_parser else []
        )
        self.calls_sent = [0] * num_choices

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = []
        for e in entries:
            entry = _chat_entry(e.token, e.logprob)
            entry["top_logprobs"] = [_chat_entry(t, lp) for _, t, lp in e.top]
            content.append(entry)
        return {"content": content, "refusal": None}

    def chunk(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        """The stream chunk of a delta; the first choice's first one carries the prompt's
        logprobs when they were asked for (at the top level, as in vLLM's chat response)."""
        body = super().chunk(delta)
        if delta.prompt_logprobs is not None and delta.index == 0:
            body = body or self._envelope([], self.chunk_object)
            body["prompt_logprobs"] = vllm_prompt_logprobs(delta.prompt_logprobs)
        return body

    def response(self, used: dict[str, int]) -> dict[str, Any]:
        """The whole non-streamed response, with the prompt's logprobs when asked for."""
        body = super().response(used)
        if self.prompt_logprobs[0] is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(self.prompt_logprobs[0])
        return body

    def opening_chunks(self) -> list[dict[str, Any]]:
        """One chunk per choice announcing the assistant role."""
        chunks = []
        for index in range(len(self.texts)):
            choice = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            body = self._envelope([choice], self.chunk_object)
            if self.stream_usage:
                body["usage"] = None
            chunks.append(body)
        return chunks

    def _split(self, delta: ChoiceDelta) -> tuple[str, list[ToolCall]]:
        """The delta's content and the tool calls it completes."""
        if self.tool_parser is None:
            return delta.text, []
        stream = self.tool_streams[delta.index]
        text, calls = stream.feed(delta.text)
        if delta.finish_reason is not None:
            rest, more = stream.finish()
            text, calls = text + rest, calls + more
        return text, calls

    @staticmethod
    def _reason(reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" else reason

    def _chunk_choice(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        text, calls = self._split(delta)
        if not text and not calls and not delta.logprobs and delta.finish_reason is None:
            return None
        body: dict[str, Any] = {"content": text} if text or delta.logprobs else {}
        if calls:
            first = self.calls_sent[delta.index]
            body["tool_calls"] = [c.as_dict(first + i) for i, c in enumerate(calls)]
            self.calls_sent[delta.index] += len(calls)
        called = bool(self.calls_sent[delta.index])
        return {
            "index": delta.index,
            "delta": body,
            "logprobs": self._chat_logprobs(delta.logprobs),
            "finish_reason": self._reason(delta.finish_reason, called),
        }

    def _final_choice(self, index: int) -> dict[str, Any]:
        content: str | None = self.texts[index]
        calls: list[ToolCall] = []
        if self.tool_parser is not None:
            content, calls = parse_tool_calls(self.tool_parser, self.texts[index])
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [call.as_dict() for call in calls]
        return {
            "index": index,
            "message": message,
            "logprobs": self._chat_logprobs(self.token_logprobs[index]),
            "finish_reason": self._reason(self.finish_reasons[index], bool(calls)),
        }

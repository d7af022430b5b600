"""Incremental detokenization and stop-string matching for one generated sequence.

The detokenizer turns a stream of token ids into a stream of text pieces whose concatenation equals the
decoded completion; it never emits half a UTF-8 character. The stop matcher cuts the text before the first
stop string and holds back any tail that could still become one, so streamed text never shows a stop
string or a piece of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 6


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer needs."""

    def decode(self, token_ids: list[int], **kwargs: bool) -> str:
        """Text of token_ids."""
        ...


class IncrementalDetokenizer:
    """Token ids in, new text out; the last prompt tokens give the first token its context."""

    def __init__(
        self, tokenizer: Decoder, prompt_ids: Sequence[int] = (), skip_special: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """The text that token_id completes (empty while it ends inside a multi-byte character)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever text is still held back, at the end of the sequence."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts a growing text at the first of its stop strings; the stop text itself is emitted only
    with include (vLLM's include_stop_str_in_output)."""

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of held + text that is safe to emit now; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        buffer = self.held + text
        if not self.stops:
            self.held = ""
            return buffer
        found = [(i + len(s), i) for s in self.stops if (i := buffer.find(s)) >= 0]
        if found:  # the stop that completes first wins, as it would token by token
            self.stopped = True
            self.held = ""
            end, start = min(found)
            return buffer[: end if self.include else start]
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back tail, at the end of the sequence when no stop string completed."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest tail of buffer that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:k]):
                    longest = k
                    break
        return longest

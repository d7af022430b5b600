"""One HTTP request's engine requests (prompts x n choices), merged into one stream of choice deltas.

Each choice is its own engine request (seed, seed+1, ... per prompt). Text is detokenized incrementally
and cut at stop strings here; a choice that hits a stop string is aborted in the engine at once. `start`
waits for every choice's first output, so engine refusals (unknown adapter, context too long,
overloaded) surface as HTTP errors before any response byte is sent. `close` aborts whatever is still
running: call it in a `finally` so a disconnected client frees its sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import EngineError, SamplingParams, TokenOutput
from server.errors import APIError
from server.stops import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("loraplex.http")

Event = tuple[int, TokenOutput | BaseException | None]  # None: the engine stream ended


@dataclass
class TokenLogprob:
    """One token's id, text and logprob (None: a prompt's first token, which nothing predicts),
    its rank when known, and the top alternatives (token id, text, logprob)."""

    token_id: int
    token: str
    logprob: float | None
    rank: int | None = None
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class OutputOptions:
    """How a choice's tokens become its output: stop strings (kept in the text with
    include_stop, as the stop token that ended it is), special tokens skipped or not, per prompt
    the text echoed before the completion (None: no echo), and whether the first delta carries
    the prompt's logprobs (vLLM's prompt_logprobs)."""

    stops: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    echo: tuple[str, ...] | None = None
    prompt_logprobs: bool = False


@dataclass
class ChoiceDelta:
    """New text (maybe empty) of one choice, the logprobs of the tokens behind it, and its end."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None  # machine-readable reason of an "error" finish, when known
    # on a choice's first delta when the request asked: its prompt's tokens and their logprobs
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class ChoiceState:
    """Per-choice bookkeeping: its prompt, detokenizer, stop matcher, counts, timing."""

    prompt: int  # index of its prompt
    detok: IncrementalDetokenizer
    stops: StopMatcher
    opened: bool = False  # whether its first delta went out
    tokens: int = 0
    finish_reason: str | None = None
    last_token_at: float | None = None


TokenObserver = Callable[[float | None, float | None], None]  # (ttft_s, inter_token_s)


ENGINE_FAILED = "the engine failed on this request"
ENGINE_ERROR_STATUS = {"internal_error": 500, "model_not_found": 404}  # other codes: 503


def engine_error(message: str | None, code: str | None) -> APIError:
    """The HTTP error for a request the engine ended with an error: 500 without a code (the
    engine's message stays in the log), else the code's status (503 engine_dead, ...)."""
    if code is None:
        return APIError(ENGINE_FAILED, 500, "internal_error")
    return APIError(message or ENGINE_FAILED, ENGINE_ERROR_STATUS.get(code, 503), code)


def refused(out: TokenOutput) -> APIError:
    """The HTTP error for a request the engine failed before its first token."""
    return engine_error(out.error, out.error_code or "internal_error")


class Generation:
    """The engine requests of one HTTP request; iterate `deltas()` after `start()`."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        prompts: list[list[int]],
        adapter: str | None,
        params: SamplingParams,
        n: int,
        options: OutputOptions,
        request_id: str,
        timeout_s: float,
        on_token: TokenObserver | None = None,
        cache_namespace: str = "",
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.request_id = request_id
        self.on_token = on_token
        self.cache_namespace = cache_namespace
        self.started_at = time.monotonic()
        self.deadline = self.started_at + timeout_s
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.jobs: list[tuple[list[int], SamplingParams]] = []
        self.states: list[ChoiceState] = []
        self.options = options
        self.min_tokens = params.min_tokens
        self.prompts = prompts
        self._prompt_entries: dict[int, list[TokenLogprob]] = {}
        for number, prompt in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                self.jobs.append((prompt, dataclasses.replace(params, seed=seed)))
                detok = IncrementalDetokenizer(tokenizer, prompt, options.skip_special_tokens)
                stops = StopMatcher(options.stops, options.include_stop)
                self.states.append(ChoiceState(number, detok, stops))
        self.first_choices = range(0, len(self.jobs), n)  # each prompt's first choice
        self.cached = [0] * len(self.jobs)  # prompt tokens each choice found in the prefix cache
        self.want_logprobs = params.logprobs is not None
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._buffer: deque[Event] = deque()
        self._tasks: list[asyncio.Task] = []

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far over all choices."""
        return sum(s.tokens for s in self.states)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (each prompt counted once, by its first
        choice, as prompt_tokens counts it)."""
        return sum(self.cached[i] for i in self.first_choices)

    def engine_id(self, index: int) -> str:
        """The engine request id of choice index."""
        return f"{self.request_id}-{index}"

    async def _pump(self, index: int) -> None:
        prompt, params = self.jobs[index]
        try:
            async for out in self.engine.generate(
                prompt, self.adapter, params, self.engine_id(index), self.cache_namespace
            ):
                self._queue.put_nowait((index, out))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((index, error))
        finally:
            self._queue.put_nowait((index, None))

    async def _next(self, buffered: bool = True) -> Event:
        if buffered and self._buffer:
            return self._buffer.popleft()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(self._queue.get(), remaining)

    async def start(self) -> None:
        """Submit every choice and wait for each one's first output; raise if any was refused."""
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.jobs))]
        seen: set[int] = set()
        try:
            while len(seen) < len(self.jobs):
                event = await self._next(buffered=False)
                index, item = event
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failed: {item}") from item
                if item is not None and item.token_id is None and item.finish_reason == "error":
                    raise refused(item)
                seen.add(index)
                self._buffer.append(event)
        except TimeoutError:
            self.close()
            raise APIError("the request timed out in the queue", 504, "timeout") from None
        except BaseException:
            self.close()
            raise

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Text deltas of all choices in arrival order, each choice ending with a finish_reason."""
        try:
            while any(s.finish_reason is None for s in self.states):
                try:
                    index, item = await self._next()
                except TimeoutError:
                    for index, state in enumerate(self.states):
                        if state.finish_reason is None:
                            yield self._finish(index, "abort", "", [])
                    return
                if self.states[index].finish_reason is not None:
                    continue
                delta = self._on_event(index, item)
                if delta is not None:
                    yield delta
        finally:
            self.close()

    def _on_event(self, index: int, item: TokenOutput | BaseException | None) -> ChoiceDelta | None:
        state = self.states[index]
        if item is None or isinstance(item, BaseException):
            if item is not None:
                log.error("engine stream of %s failed: %r", self.engine_id(index), item)
            return self._finish(index, "error", "", [], "the engine failed")
        text, logprobs, prompt = "", [], None
        if not state.opened:  # the echoed prompt and the prompt's scores come first
            state.opened = True
            scored = self._prompt_scores(state.prompt, item)
            prompt = scored if self.options.prompt_logprobs else None
            if self.options.echo is not None:
                text = self.options.echo[state.prompt]
                logprobs = list(scored or []) if self.want_logprobs else []
        if item.token_id is not None:
            self.cached[index] = item.cached_tokens
            state.tokens += 1
            self._observe(state)
            # a stop token (EOS or stop_token_ids) ends the text without its own, unless asked
            ended = item.finish_reason == "stop" and not self.options.include_stop
            piece = "" if ended else state.detok.add(item.token_id)
            text += state.stops.feed(piece) if state.tokens >= self.min_tokens else piece
            if self.want_logprobs and item.logprob is not None:
                logprobs.append(self._logprob(item))
            if state.stops.stopped:
                return self._finish(index, "stop", text, logprobs, prompt=prompt)
        if item.finish_reason is not None:
            text += state.stops.feed(state.detok.flush())
            reason = "stop" if state.stops.stopped else item.finish_reason
            rest = text + state.stops.flush()
            return self._finish(
                index, reason, rest, logprobs, item.error, item.error_code, prompt=prompt
            )
        return ChoiceDelta(index, text, logprobs, prompt_logprobs=prompt)

    def _prompt_scores(self, number: int, out: TokenOutput) -> list[TokenLogprob] | None:
        """The tokens and logprobs of prompt `number` from its first output (built once per
        prompt); None when the engine did not score it."""
        if out.prompt_logprobs is None:
            return None
        if number not in self._prompt_entries:
            decode = self.tokenizer.decode
            entries = []
            for token, scored in zip(self.prompts[number], out.prompt_logprobs, strict=True):
                if scored is None:
                    entries.append(TokenLogprob(token, decode([token]), None))
                    continue
                top = [(t, decode([t]), lp) for t, lp in scored.top]
                entries.append(
                    TokenLogprob(token, decode([token]), scored.logprob, scored.rank, top)
                )
            self._prompt_entries[number] = entries
        return self._prompt_entries[number]

    def _finish(
        self,
        index: int,
        reason: str,
        text: str,
        logprobs: list[TokenLogprob],
        error: str | None = None,
        error_code: str | None = None,
        prompt: list[TokenLogprob] | None = None,
    ) -> ChoiceDelta:
        self.states[index].finish_reason = reason
        self._abort(index)
        return ChoiceDelta(index, text, logprobs, reason, error, error_code, prompt)

    def _observe(self, state: ChoiceState) -> None:
        now = time.monotonic()
        if self.on_token is not None:
            if state.last_token_at is None:
                self.on_token(now - self.started_at, None)
            else:
                self.on_token(None, now - state.last_token_at)
        state.last_token_at = now

    def _logprob(self, out: TokenOutput) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = [(tid, decode([tid]), lp) for tid, lp in out.top_logprobs]
        return TokenLogprob(out.token_id, decode([out.token_id]), float(out.logprob), top=top)

    def _abort(self, index: int) -> None:
        if index < len(self._tasks) and not self._tasks[index].done():
            self._tasks[index].cancel()
            self.engine.abort(self.engine_id(index))

    def close(self) -> None:
        """Abort every choice still running in the engine (safe to call more than once)."""
        for index in range(len(self._tasks)):
            self._abort(index)

"""Public value types of the engine API: sampling parameters, per-token outputs, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class EngineError(RuntimeError):
    """A request cannot be accepted; `code` and `status` map to an OpenAI-style HTTP error."""

    def __init__(self, message: str, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; a temperature below GREEDY_BELOW means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # stop tokens and EOS are masked until this many tokens are out
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and generated tokens (CTRL, as transformers)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to its logit
    logprobs: int | None = None
    # logprobs of the prompt's tokens (None for the first) with this many top alternatives each
    prompt_logprobs: int | None = None
    # an xgrammar.CompiledGrammar: every sampled token must keep the output inside it, and the
    # request stops when the grammar is complete (its only next token is an end of sequence)
    grammar: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError("max_tokens must be >= 1 (0 only to score the prompt)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        for k in (self.logprobs, self.prompt_logprobs):
            if k is not None and not 0 <= k <= 20:
                raise ValueError("logprobs and prompt_logprobs must be between 0 and 20")

    @property
    def greedy(self) -> bool:
        """Whether decoding is deterministic argmax (vLLM's rule: logits over a temperature this
        small overflow to inf)."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


@dataclass
class Logprob:
    """A token's logprob given the tokens before it, its rank in the vocabulary (1: the most
    likely; tokens of equal logprob count as ahead, as vLLM counts) and the top alternatives
    (token id, logprob)."""

    logprob: float
    rank: int | None  # None where not computed (generated tokens)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenOutput:
    """One generated token of one request, or its end (token_id None when finished without one)."""

    request_id: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # with a request's first output when it asked: one entry per prompt token, None for the first
    prompt_logprobs: list[Logprob | None] | None = None
    error: str | None = None
    error_code: str | None = None  # machine-readable reason of an "error" finish, when known


@dataclass
class EngineStats:
    """A snapshot of the engine's queues and memory."""

    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    resident_adapters: int
    steps: int
    preemptions: int
    generated_tokens: int
    host_adapters: int = 0  # adapters in the host-memory cache
    adapter_host_bytes: int = 0  # their float32 weight bytes
    adapter_device_bytes: int = 0  # device bytes of the adapters held (each at its own rank)
    adapter_memory_budget: int = 0  # device bytes adapters may take (--adapter-memory)
    adapter_loads: int = 0  # adapters read from disk by the background loader
    adapter_slot_loads: int = 0  # adapters copied into a device slot (each a cold start there)
    adapter_pins: int = 0  # running or waiting sequences holding an adapter slot
    open_streams: int = 0  # requests whose output stream has not ended (AsyncEngine)
    prefix_cached_blocks: int = 0  # KV blocks in the prefix cache, held or not
    # prompt tokens looked up in / found in the prefix cache, by adapter name (None: the base)
    prefix_queried_tokens: dict[str | None, int] = field(default_factory=dict)
    prefix_hit_tokens: dict[str | None, int] = field(default_factory=dict)

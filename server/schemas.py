"""OpenAI request schemas for /v1/completions and /v1/chat/completions.

Unknown fields are refused (extra="forbid"; the error handler names the field). Fields that loraplex does
not implement but that clients commonly send at their neutral value (presence_penalty=0, echo=false, ...)
are accepted at that value only, and refused with a 400 naming them otherwise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16
MAX_CHOICES = 64
MAX_STOPS = 16
SEED_LIMIT = 2**63 - 1 - MAX_N


class StrictModel(BaseModel):
    """A schema that refuses unknown fields."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    """`stream_options`: only include_usage is supported."""

    include_usage: bool | None = None


class SamplingRequest(StrictModel):
    """Fields shared by completions and chat completions. None means the OpenAI default."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-SEED_LIMIT, le=SEED_LIMIT)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="vLLM's prefix-cache salt: only requests with the same salt (and key, "
        "adapter weights and tokens) share cached prompt blocks",
    )
    # accepted at their neutral value only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are supported")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported; only 0 is accepted")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; only an empty map is accepted")
        return value

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=20)
    # accepted at their neutral value only
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported; use n")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class ChatMessage(StrictModel):
    """One chat message; content is a string or a list of text parts."""

    role: str
    content: str | list[dict[str, Any]]
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in ("system", "developer", "user", "assistant"):
            raise ValueError("role must be system, developer, user or assistant")
        return value

    @field_validator("content")
    @classmethod
    def _check_parts(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, list):
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({type: text, text}) are supported")
                if set(part) - {"type", "text"}:
                    raise ValueError("text content parts take only `type` and `text`")
        return value

    def template_dict(self) -> dict[str, str]:
        """The message as the chat template expects it (text parts joined)."""
        text = self.content
        if isinstance(text, list):
            text = "".join(part["text"] for part in text)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # accepted at their neutral value only
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError("only {type: text} is supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tool calling is not supported")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | None) -> str | None:
        if value not in (None, "none"):
            raise ValueError("tool calling is not supported; only `none` is accepted")
        return value

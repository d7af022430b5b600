"""Schema -> engine inputs: resolve the model name, tokenize prompts, build SamplingParams."""

from __future__ import annotations

from typing import Any

from loader.chat import render_chat
from server.engine.types import SamplingParams
from server.errors import APIError
from server.schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, SamplingRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16


def resolve_model(model: str, base_name: str, adapters: list[str]) -> str | None:
    """None for the base id, the adapter name for an adapter; 404 model_not_found otherwise."""
    if model == base_name:
        return None
    if model in adapters:
        return model
    raise APIError(f"The model `{model}` does not exist.", 404, "model_not_found", "model")


def check_common(req: SamplingRequest) -> None:
    """Cross-field rules that a single field validator cannot express."""
    if req.stream_options is not None and not req.stream:
        raise APIError(
            "stream_options is only allowed when stream is true",
            400,
            "invalid_value",
            "stream_options",
        )


def sampling_params(
    req: SamplingRequest, max_tokens: int, logprobs: int | None, grammar: Any = None
) -> SamplingParams:
    """The engine parameters of one choice (before its per-choice seed offset); grammar: a
    compiled grammar the output must follow."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        seed=req.seed,
        logprobs=logprobs,
        grammar=grammar,
    )


def _check_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    if not ids:
        raise APIError(f"{param} encodes to no tokens", 400, "empty_prompt", param)
    if any(i < 0 or i >= vocab_size for i in ids):
        raise APIError(
            f"{param} holds token ids outside the vocabulary [0, {vocab_size})",
            400,
            "invalid_value",
            param,
        )
    return ids


def encode_completion_prompts(tokenizer: Any, req: CompletionRequest) -> list[list[int]]:
    """Each prompt as token ids (text is tokenized with the tokenizer's special tokens)."""
    prompts = req.prompts
    if len(prompts) * (req.n or 1) > MAX_CHOICES:
        raise APIError(
            f"prompts x n must be at most {MAX_CHOICES}", 400, "too_many_choices", "prompt"
        )
    vocab = len(tokenizer)
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        encoded.append(_check_ids(ids, vocab, "prompt"))
    return encoded


def encode_chat(
    tokenizer: Any, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The messages (and tools) rendered for the base with the generation prompt, as token ids."""
    messages = [m.template_dict() for m in req.messages]
    try:
        text = render_chat(tokenizer, messages, tools)
    except Exception as error:  # the template rejects this conversation (e.g. role order)
        raise APIError(
            f"the chat template rejected the messages: {error}",
            400,
            "template_rejected",
            "messages",
        ) from error
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return _check_ids(ids, len(tokenizer), "messages")


def completion_max_tokens(req: CompletionRequest) -> int:
    """max_tokens, 16 when absent (OpenAI's default for completions)."""
    return req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS


def chat_max_tokens(req: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> int:
    """max_completion_tokens or max_tokens; absent, the rest of the context window."""
    wanted = req.max_completion_tokens or req.max_tokens
    if wanted is not None:
        return wanted
    left = max_model_len - prompt_len
    if left < 1:
        raise APIError(
            f"the prompt has {prompt_len} tokens; this model's context is {max_model_len}",
            400,
            "context_length_exceeded",
            "messages",
        )
    return left


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """The engine's top-k logprob count, None when logprobs are off."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(
            "top_logprobs requires logprobs to be true", 400, "invalid_value", "top_logprobs"
        )
    return (req.top_logprobs or 0) if req.logprobs else None

"""Schema -> engine inputs: resolve the model name, tokenize prompts, build SamplingParams."""

from __future__ import annotations

from typing import Any

from loader.chat import render_chat
from server.engine.types import SamplingParams
from server.errors import APIError
from server.generation import OutputOptions
from server.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)

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
    req: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    vocab_size: int,
    grammar: Any = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine parameters of one choice (before its per-choice seed offset); grammar: a
    compiled grammar the output must follow; prompt_logprobs: how many top alternatives each
    prompt token's logprob comes with (None: the prompt is not scored)."""
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(
            f"min_tokens ({req.min_tokens}) must not exceed the output's limit ({max_tokens})",
            400,
            "min_tokens_above_max_tokens",
            "min_tokens",
        )
    stop_ids = check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    check_token_ids(list(bias), vocab_size, "logit_bias")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=req.min_tokens or 0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=tuple(sorted(bias.items())),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
    )


def output_options(req: SamplingRequest, echo: list[str] | None = None) -> OutputOptions:
    """How the request's tokens become its output (echo: per prompt, the text put before it)."""
    return OutputOptions(
        stops=tuple(req.stops),
        include_stop=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        echo=None if echo is None else tuple(echo),
        prompt_logprobs=req.prompt_logprobs is not None,
    )


def completion_echo(tokenizer: Any, req: CompletionRequest) -> list[str] | None:
    """With echo, each prompt's text as given (token-id prompts decoded), else None."""
    if not req.echo:
        return None
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts]


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    """ids, or a 400 naming param when one is outside [0, vocab_size)."""
    if any(i < 0 or i >= vocab_size for i in ids):
        raise APIError(
            f"{param} holds token ids outside the vocabulary [0, {vocab_size})",
            400,
            "token_out_of_vocabulary",
            param,
        )
    return ids


def _check_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    if not ids:
        raise APIError(f"{param} encodes to no tokens", 400, "empty_prompt", param)
    return check_token_ids(ids, vocab_size, param)


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


def render_messages(
    tokenizer: Any, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
) -> str:
    """The messages (and tools) rendered by the base's chat template with the generation prompt."""
    try:
        return render_chat(tokenizer, [m.template_dict() for m in messages], tools)
    except Exception as error:  # the template rejects this conversation (e.g. role order)
        raise APIError(
            f"the chat template rejected the messages: {error}",
            400,
            "template_rejected",
            "messages",
        ) from error


def encode_chat(
    tokenizer: Any, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The messages (and tools) rendered for the base with the generation prompt, as token ids."""
    text = render_messages(tokenizer, req.messages, tools)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return _check_ids(ids, len(tokenizer), "messages")


def completion_max_tokens(req: CompletionRequest) -> int:
    """max_tokens, 16 when absent (OpenAI's default for completions); 0 only to score the prompt."""
    if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
        raise APIError(
            "max_tokens 0 only scores the prompt: set echo or prompt_logprobs",
            400,
            "invalid_value",
            "max_tokens",
        )
    return COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens


def completion_prompt_logprobs(req: CompletionRequest) -> int | None:
    """How many top alternatives each prompt token is scored with: echo with logprobs asks for
    the prompt's logprobs, as vLLM's prompt_logprobs does; None when neither asks."""
    wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    return max(wanted) if wanted else None


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

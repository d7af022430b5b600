"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from server.auth import may_use
from server.engine.types import EngineStats
from server.errors import APIError
from server.formatting import ChatFormat, CompletionFormat
from server.responding import respond
from server.response_schemas import (
    GENERATION_ERRORS,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelCard,
    ModelList,
    documented,
)
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.state import get_state
from server.structured import output_spec
from server.tool_calls import tool_use
from server.translate import (
    chat_logprobs,
    chat_max_tokens,
    check_common,
    completion_echo,
    completion_max_tokens,
    completion_prompt_logprobs,
    encode_chat,
    encode_completion_prompts,
    output_options,
    sampling_params,
)

router = APIRouter(prefix="/v1")


def adapter_memory(stats: EngineStats) -> dict[str, int]:
    """The device's adapter budget (--adapter-memory), the bytes in use and free."""
    budget, used = stats.adapter_memory_budget, stats.adapter_device_bytes
    return {"budget_bytes": budget, "used_bytes": used, "free_bytes": budget - used}


def _model_cards(request: Request) -> list[dict[str, Any]]:
    """The base model's card and those of the adapters the key may use."""
    st = get_state(request)
    base = {
        "id": st.base_name,
        "object": "model",
        "created": st.started,
        "owned_by": "loraplex",
        "root": str(st.engine.base.path),
        "parent": None,
        "max_model_len": st.engine.max_model_len,
        "metadata": {"adapter_memory": adapter_memory(st.engine.stats())},
    }
    adapters = [
        {
            "id": name,
            "object": "model",
            "created": st.started,
            "owned_by": "loraplex",
            "root": info["path"],
            "parent": st.base_name,
            "metadata": {k: info[k] for k in ("rank", "bytes", "device_bytes", "tier")},
        }
        for name, info in st.engine.adapter_info().items()
        if may_use(request, name, st.base_name)
    ]
    return [base, *adapters]


@router.get("/models", responses=documented(ModelList, 401, 503))
async def list_models(request: Request) -> dict[str, Any]:
    """The base model and every adapter the key may use (adapters name the base as `parent`)."""
    return {"object": "list", "data": _model_cards(request)}


@router.get("/models/{model:path}", responses=documented(ModelCard, 401, 404, 503))
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    """One model of the list (OpenAI's retrieve); 404 for a model the key may not use."""
    for card in _model_cards(request):
        if card["id"] == model:
            return card
    raise APIError(f"The model `{model}` does not exist.", 404, "model_not_found", "model")


@router.post(
    "/completions", responses=documented(Completion, *GENERATION_ERRORS, stream=CompletionChunk)
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Text completion of one or more prompts, n choices each."""
    st = get_state(request)
    adapter = st.resolve(body.model)  # an unknown model is a 404 before any other check
    check_common(body)
    prompts = encode_completion_prompts(st.tokenizer, body)
    spec = output_spec(body)
    grammar = await st.grammars.compile(spec) if spec is not None else None
    vocab = len(st.tokenizer)
    max_tokens = completion_max_tokens(body)
    scored = completion_prompt_logprobs(body)
    params = sampling_params(body, max_tokens, body.logprobs, vocab, grammar, scored)
    n = body.n or 1
    fmt = CompletionFormat(
        body.model, len(prompts) * n, body.logprobs is not None, body.include_usage
    )
    namespace = st.cache_namespace(request, body.cache_salt)
    options = output_options(body, completion_echo(st.tokenizer, body))
    gen = st.generation(body.model, adapter, prompts, params, n, options, fmt.id, namespace)
    return await respond(request, gen, fmt, bool(body.stream))


@router.post(
    "/chat/completions",
    responses=documented(ChatCompletion, *GENERATION_ERRORS, stream=ChatCompletionChunk),
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion: the messages (and tools) through the base's chat template, n choices; the
    output constrained by response_format, structured_outputs or a forced tool call."""
    st = get_state(request)
    adapter = st.resolve(body.model)  # an unknown model is a 404 before any other check
    check_common(body)
    logprobs = chat_logprobs(body)
    tools = tool_use(body, st.config.tool_call_parser)
    spec = output_spec(body)
    if spec is not None and tools.grammar is not None:
        raise APIError(
            "a forced tool call cannot also follow response_format or structured_outputs",
            400,
            "invalid_value",
            "tool_choice",
        )
    spec = spec or tools.grammar
    prompt = encode_chat(st.tokenizer, body, tools.tools)
    grammar = await st.grammars.compile(spec) if spec is not None else None
    max_tokens = chat_max_tokens(body, len(prompt), st.engine.max_model_len)
    vocab = len(st.tokenizer)
    params = sampling_params(body, max_tokens, logprobs, vocab, grammar, body.prompt_logprobs)
    n = body.n or 1
    fmt = ChatFormat(body.model, n, logprobs is not None, body.include_usage, tools.parser)
    namespace = st.cache_namespace(request, body.cache_salt)
    options = output_options(body)
    gen = st.generation(body.model, adapter, [prompt], params, n, options, fmt.id, namespace)
    return await respond(request, gen, fmt, bool(body.stream))

"""Response bodies of the HTTP API as pydantic models: they document the routes in the OpenAPI schema
(which the fuzz test checks real responses against); the routes still build plain dicts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.errors import RUNTIME_RULES

FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503, 504)  # what a completion may answer
RUNTIME_RULES_TEXT = "OpenAI-shaped error. Besides schema violations, a request is refused for " + (
    "these rules, which no JSON Schema can state (`error.code`: when):\n"
    + "\n".join(f"- `{code}`: {when}" for code, when in RUNTIME_RULES.items())
)


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: `{"error": {...}}`."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    """Where the prompt's tokens came from."""

    cached_tokens: int = Field(
        description="prompt tokens whose KV was reused from the prefix cache"
    )


class Usage(BaseModel):
    """Token counts of a response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs object (with echo, the prompt's tokens first: the first
    one's logprob and top alternatives null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class PromptTokenLogprob(BaseModel):
    """vLLM's entry of a prompt position: a token's logprob, rank and text."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptTokenLogprob] | None] | None
PROMPT_LOGPROBS = Field(
    None,
    description="vLLM's prompt_logprobs: per prompt token (null for the first) its own entry and "
    "the top alternatives', by token id",
)


class CompletionChoice(BaseModel):
    """One choice of a text completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs = PROMPT_LOGPROBS


class Completion(BaseModel):
    """POST /v1/completions without streaming."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    """One candidate token with its logprob and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token's logprob with its top alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """The chat logprobs object."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    """The function a tool call invokes, its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One call in the assistant's `tool_calls`."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    """The assistant's message: content, and the tool calls it made (when tools were given)."""

    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions without streaming."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs = PROMPT_LOGPROBS


class CompletionChunkChoice(BaseModel):
    """One choice's new text in a streamed completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs = PROMPT_LOGPROBS


class CompletionChunk(BaseModel):
    """One event of a streamed /v1/completions (no choices and the usage in the last, when asked)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ToolCallDelta(ToolCall):
    """A complete tool call in a stream delta, with its position among the choice's calls."""

    index: int


class ChatDelta(BaseModel):
    """What a chat stream event adds to the assistant's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    """One choice's delta in a streamed chat completion."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed /v1/chat/completions (no choices and the usage in the last, when
    asked)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs = PROMPT_LOGPROBS


class ModelCard(BaseModel):
    """The base model or one adapter (adapters name the base as parent)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int | None = None
    metadata: dict[str, Any] | None = None


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"]
    data: list[ModelCard]


class ModelUsageCard(BaseModel):
    """One row of GET /v1/adapters: the base (parent null) or an adapter, and what it has served."""

    id: str
    parent: str | None
    rank: int | None = None
    tier: Literal["device", "host", "disk"] | None = None
    bytes: int | None = None  # float32 weight bytes of an adapter
    requests: int  # generation requests naming this model since the server started
    generated_tokens: int


class DeviceAdapterMemory(BaseModel):
    """Device memory for adapter weights (each adapter at its own rank)."""

    resident_adapters: int
    budget_bytes: int  # --adapter-memory
    used_bytes: int
    free_bytes: int


class AdapterUsageList(BaseModel):
    """GET /v1/adapters: the models the key may use with their counters, the key's role, and the
    device's adapter memory."""

    object: Literal["list"]
    role: Literal["admin", "user"]
    data: list[ModelUsageCard]
    device: DeviceAdapterMemory


class Tokens(BaseModel):
    """POST /tokenize: the prompt's token ids (and their texts when asked)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class Text(BaseModel):
    """POST /detokenize."""

    prompt: str


class Health(BaseModel):
    """GET /health: ok, or dead with the reason the engine stopped."""

    status: Literal["ok", "dead"]
    reason: str | None = None


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """model's JSON schema with its $defs substituted in place (it is embedded where document-root
    references would not resolve)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


def sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """The schema of one server-sent event of a stream of `chunk`s: its `data` is a chunk or an
    error as JSON, or the final `[DONE]`."""
    payload = {"anyOf": [inline_schema(chunk), inline_schema(ErrorResponse)]}
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}},
    }


def documented(
    ok: type[BaseModel] | None, *errors: int, stream: type[BaseModel] | None = None
) -> dict:
    """FastAPI `responses=` for a route: its 200 body (and its events when it streams `stream`
    chunks) and its error codes."""
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": "OpenAI-shaped error"} for code in errors
    }
    if stream is not None and 400 in responses:  # a generation route
        responses[400]["description"] = RUNTIME_RULES_TEXT
    if ok is not None:
        responses[200] = {"model": ok, "description": "Successful response"}
        if stream is not None:
            responses[200]["content"] = {"text/event-stream": {"schema": sse_event(stream)}}
    return responses

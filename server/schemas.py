"""OpenAI request schemas for /v1/completions and /v1/chat/completions.

Unknown fields are refused (extra="forbid"; the error handler names the field). OpenAI's fields sit at
the top level, and so do vLLM's extra sampling fields (the official client sends `extra_body` keys
there). Fields that loraplex does not implement but that clients commonly send at their neutral value
(best_of=1, suffix="") are accepted at that value only, and refused with a 400 naming them otherwise.
Output constraints and
tools (response_format, structured_outputs, tools, tool_choice) are resolved by server/structured.py
and server/tool_calls.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_CHOICES = 64
MAX_STOPS = 16
MAX_TOOLS = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
# seeds stay exact as JSON numbers (doubles hold integers up to 2**53), room for n choices' offsets
SEED_LIMIT = 2**53 - 1 - MAX_N
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIdKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,8})$")]
LogitBias = Annotated[  # every key follows the pattern
    dict[TokenIdKey, Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False}),
]


def only_if(field: str, required: str, value: Any) -> dict[str, Any]:
    """A JSON Schema rule: a non-null `field` needs `required` equal to value."""
    return {
        "if": {"required": [field], "properties": {field: {"not": {"type": "null"}}}},
        "then": {"required": [required], "properties": {required: {"const": value}}},
    }


STREAM_OPTIONS_RULE = only_if("stream_options", "stream", True)
TOOLS_RULE = {  # a tool_choice other than none needs tools
    "if": {
        "required": ["tool_choice"],
        "properties": {"tool_choice": {"not": {"enum": ["none", None]}}},
    },
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}

SCORE_ONLY_RULE = {  # max_tokens 0 only scores the prompt, for echo or prompt_logprobs
    "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
    "then": {
        "anyOf": [
            {"required": ["echo"], "properties": {"echo": {"const": True}}},
            {
                "required": ["prompt_logprobs"],
                "properties": {"prompt_logprobs": {"type": "integer"}},
            },
        ]
    },
}

NO_OUTPUT_FORMAT = {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}
ONE_CONSTRAINT_RULE = {  # structured_outputs excludes a response_format other than text
    "if": {
        "required": ["structured_outputs"],
        "properties": {"structured_outputs": {"not": {"type": "null"}}},
    },
    "then": {"properties": {"response_format": NO_OUTPUT_FORMAT}},
}
FORCED_TOOL_RULE = {  # a forced tool call excludes other output constraints
    "if": {
        "required": ["tool_choice"],
        "properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
    },
    "then": {
        "properties": {"structured_outputs": {"type": "null"}, "response_format": NO_OUTPUT_FORMAT}
    },
}


class StrictModel(BaseModel):
    """A schema that refuses unknown fields."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    """`stream_options`: only include_usage is supported."""

    include_usage: bool | None = None


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs` extra field: exactly one constraint on the output."""

    json_: dict[str, Any] | str = Field(
        None, alias="json", description="a JSON schema (object or JSON text)"
    )
    regex: str = Field(None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] = Field(None, min_length=1, max_length=256)
    grammar: str = Field(None, min_length=1, description="an EBNF grammar (GBNF style)")
    json_object: Literal[True] = None

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"minProperties": 1, "maxProperties": 1},
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        fields = ("json_", "regex", "choice", "grammar", "json_object")
        given = [k for k in fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object")
        return self


class SamplingRequest(StrictModel):
    """Fields shared by completions and chat completions. None means the OpenAI default."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOPS)] | None = None
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
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's output constraint: json (a schema), regex, choice or grammar"
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="subtracted once from the logit of every generated token"
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="subtracted from a token's logit per time it was generated"
    )
    logit_bias: LogitBias | None = Field(
        None, description="token id -> bias added to its logit before sampling"
    )
    # vLLM's extra sampling fields
    repetition_penalty: float | None = Field(
        None,
        gt=0,
        le=10,
        description="vLLM's: logits of tokens in the prompt or output divided (if positive) or "
        "multiplied (if negative) by it",
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="drop tokens less likely than min_p x the most likely one"
    )
    min_tokens: int | None = Field(
        None, ge=0, description="stop tokens and EOS cannot end the output before this many tokens"
    )
    ignore_eos: bool | None = Field(None, description="generate past EOS until max_tokens")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="token ids that end the output"
    )
    include_stop_str_in_output: bool | None = Field(
        None, description="keep the stop string or stop token that ended the output in its text"
    )
    skip_special_tokens: bool | None = Field(
        None, description="leave special tokens out of the text (default true)"
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="vLLM's: the prompt tokens' logprobs with this many top alternatives each",
    )

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"allOf": [STREAM_OPTIONS_RULE, SCORE_ONLY_RULE]}
    )

    prompt: Prompt
    max_tokens: int | None = Field(
        None, ge=0, description="0 (with echo or prompt_logprobs) scores the prompt alone"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = Field(
        None, description="the prompt before the completion (with logprobs: the prompt's too)"
    )
    # accepted at their neutral value only
    best_of: int | None = Field(None, json_schema_extra={"enum": [1, None]})
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

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


class FunctionCall(StrictModel):
    """A call the assistant made: the function's name and its arguments as a JSON string."""

    name: str = Field(pattern=NAME_PATTERN)
    arguments: str


class TextPart(StrictModel):
    """A text content part (the only kind supported)."""

    type: Literal["text"]
    text: str


class MessageToolCall(StrictModel):
    """One entry of an assistant message's `tool_calls`."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    """One chat message; content is a string or a list of text parts (absent: empty, as on an
    assistant message that only calls tools); a tool result names the call in tool_call_id."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as loader.chat.render_chat takes it (text parts joined, absent content
        empty; tool_calls only on assistant messages, the only role that makes calls)."""
        text = self.content or ""
        if isinstance(text, list):
            text = "".join(part.text for part in text)
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": text}
        if self.tool_calls and self.role == "assistant":
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class JsonSchemaFormat(StrictModel):
    """`response_format.json_schema`."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(StrictModel):
    """OpenAI's `response_format`: text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # what _schema_with_type enforces
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["json_schema"],
                "properties": {"json_schema": {"type": "object"}},
            },
            "else": {"properties": {"json_schema": {"type": "null"}}},
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class FunctionDefinition(StrictModel):
    """A function the model may call."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    """The function a named tool_choice forces."""

    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(StrictModel):
    """`tool_choice: {type: function, function: {name}}`."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                STREAM_OPTIONS_RULE,
                only_if("top_logprobs", "logprobs", True),
                TOOLS_RULE,
                ONE_CONSTRAINT_RULE,
                FORCED_TOOL_RULE,
            ]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

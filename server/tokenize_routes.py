"""vLLM's tokenizer routes: POST /tokenize (a prompt, or chat messages through the template) and
POST /detokenize, with the served base's tokenizer. Like /v1 they need the API key when keys are
configured, and a key may name only the models it may use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, field_validator, model_validator

from server.auth import may_use
from server.errors import APIError
from server.response_schemas import Text, Tokens, documented
from server.schemas import ChatMessage, NonEmptyText, StrictModel, TokenIds
from server.state import get_state
from server.translate import check_token_ids, render_messages, resolve_model

router = APIRouter()


class TokenizeRequest(StrictModel):
    """A text prompt, or chat messages rendered with the chat template (vLLM's two forms)."""

    model: str | None = Field(None, description="the base or an adapter (default: the base)")
    prompt: NonEmptyText | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None,
        description="the tokenizer's special tokens (default: true for prompt, false for messages)",
    )
    return_token_strs: bool | None = None

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # no lax coercion ("1" -> True): the schema is what is accepted
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(StrictModel):
    """Token ids to text."""

    model: str | None = None
    tokens: TokenIds

    @field_validator("tokens", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        """Integers only: no lax coercion of strings or booleans ("7", true) to token ids."""
        if isinstance(value, list) and any(isinstance(v, str | bool) for v in value):
            raise ValueError("token ids must be integers")
        return value


def check_model(request: Request, model: str | None) -> None:
    """404 model_not_found unless model (absent: the base) is served and the key may use it."""
    st = get_state(request)
    name = model or st.base_name
    if not may_use(request, name, st.base_name):
        raise APIError(f"The model `{name}` does not exist.", 404, "model_not_found", "model")
    resolve_model(name, st.base_name, st.engine.adapter_names())


@router.post("/tokenize", responses=documented(Tokens, 400, 401, 404, 413, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """The token ids of a prompt or of chat messages as the model would see them."""
    st = get_state(request)
    check_model(request, body.model)
    tokenizer = st.tokenizer
    if body.messages is not None:
        text = render_messages(tokenizer, body.messages)
        ids = tokenizer(text, add_special_tokens=bool(body.add_special_tokens)).input_ids
    else:
        ids = tokenizer(
            body.prompt, add_special_tokens=body.add_special_tokens is not False
        ).input_ids
    reply: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": st.engine.max_model_len,
        "tokens": ids,
    }
    if body.return_token_strs:
        reply["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return reply


@router.post("/detokenize", responses=documented(Text, 400, 401, 404, 413, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """The text of token ids."""
    st = get_state(request)
    check_model(request, body.model)
    check_token_ids(body.tokens, len(st.tokenizer), "tokens")
    return {"prompt": st.tokenizer.decode(body.tokens)}

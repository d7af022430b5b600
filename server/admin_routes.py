"""Adapter admin routes in vLLM's shape: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

A refused adapter answers 400 with the AdapterError's message and code (404 when the adapter or its
folder does not exist); the server keeps serving either way. Like every /v1 route these require the
API key when one is configured.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.names import NAME_REGEX
from server.response_schemas import documented
from server.state import get_state

ADMIN_RESPONSES = {  # vLLM's plain-text success line; errors in OpenAI's JSON shape
    **documented(None, 400, 401, 403, 404, 409, 413, 503),
    200: {"description": "Success line", "content": {"text/plain": {"schema": {"type": "string"}}}},
}
LOADED = "$request.body#/lora_name"
LOAD_LINKS = {  # OpenAPI links: what a client (or a stateful test) does with a loaded adapter
    "UseInCompletion": {"operationId": "create_completion", "requestBody": {"model": LOADED}},
    "UseInChat": {"operationId": "create_chat_completion", "requestBody": {"model": LOADED}},
    "Unload": {"operationId": "unload_lora_adapter", "requestBody": {"lora_name": LOADED}},
}

router = APIRouter(prefix="/v1")


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body: the served name and the adapter folder (inside the configured adapter roots).

    load_inplace=true (the default here) replaces an adapter of the same name: requests already
    running keep the old weights, new ones get the new; false refuses an existing name.
    """

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(json_schema_extra={"pattern": NAME_REGEX})  # what validate_name accepts
    lora_path: str = Field(min_length=1)
    load_inplace: bool = True


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body: the served name of the adapter to unload."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(json_schema_extra={"pattern": NAME_REGEX})  # what validate_name accepts


@router.post(
    "/load_lora_adapter",
    responses={**ADMIN_RESPONSES, 200: {**ADMIN_RESPONSES[200], "links": LOAD_LINKS}},
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """Validate and load an adapter (read off the event loop and off the engine's step loop)."""
    engine = get_state(request).engine
    await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path, body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", responses=ADMIN_RESPONSES)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, request: Request
) -> PlainTextResponse:
    """Stop serving an adapter; requests already running on it finish normally."""
    get_state(request).engine.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

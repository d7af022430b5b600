"""The ASGI guard in front of the app: draining (503), API keys (401/403), body size (413), model access
(404, as for an unknown model) and the `n` limit (400), all answered in OpenAI's error shape.

It also counts in-flight HTTP requests so a draining server knows when the last one has finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import SCOPE_KEY, KeyRing
from server.errors import error_body

PROTECTED_PREFIX = "/v1"
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
KEYED_PATHS = frozenset({"/tokenize", "/detokenize"})  # vLLM's, outside /v1
RETRY_AFTER_S = "1"


@dataclass
class Drain:
    """Shutdown state shared by the guard and the server: draining flag and in-flight count."""

    draining: bool = False
    in_flight: int = 0


@dataclass
class Limits:
    """Request limits enforced before routing."""

    max_body_bytes: int
    max_n: int


def _error(
    message: str, status: int, code: str, param: str | None = None, retry: bool = False
) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if retry else None
    return JSONResponse(
        error_body(message, status, code, param), status_code=status, headers=headers
    )


class BodyTooLarge(Exception):
    """The request body exceeds max_body_bytes."""


class Guard:
    """ASGI middleware applying the checks in the module docstring to every HTTP request."""

    def __init__(
        self, app: ASGIApp, keys: KeyRing, limits: Limits, drain: Drain, base_name: str
    ) -> None:
        self.app = app
        self.keys = keys
        self.limits = limits
        self.drain = drain
        self.base_name = base_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer refused requests here; pass the rest on, counted as in flight."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body = _error("The server is shutting down.", 503, "shutting_down", retry=True)
            await body(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            refusal, receive = await self._check(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1

    async def _check(self, scope: Scope, receive: Receive) -> tuple[JSONResponse | None, Receive]:
        path = scope.get("path", "")
        protected = path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
        if not (protected or path in KEYED_PATHS):
            return None, receive
        key = None
        if self.keys.enabled:
            given = dict(scope["headers"]).get(b"authorization", b"")
            key = self.keys.identify(given)
            if key is None:
                return _error("Incorrect or missing API key.", 401, "invalid_api_key"), receive
            scope[SCOPE_KEY] = key
        if path in ADMIN_PATHS and key is not None and not key.is_admin:
            return _error(
                "This operation needs an admin API key.", 403, "permission_denied"
            ), receive
        if scope.get("method") != "POST":
            return None, receive
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return self._too_large(), receive
        try:
            body, replay = await self._read_body(receive)
        except BodyTooLarge:
            return self._too_large(), receive
        if path in GENERATION_PATHS:
            return self._check_generation(body, key), replay
        return None, replay

    def _too_large(self) -> JSONResponse:
        limit = self.limits.max_body_bytes
        return _error(f"The request body exceeds {limit} bytes.", 413, "request_too_large")

    async def _read_body(self, receive: Receive) -> tuple[bytes, Receive]:
        """The whole body (bounded), and a receive that replays it before the live channel."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending: list[Message] = [message]
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                pending = []
                break
        body = b"".join(chunks)
        queued = [{"type": "http.request", "body": body, "more_body": False}, *pending]

        async def replay() -> Message:
            return queued.pop(0) if queued else await receive()

        return body, replay

    def _check_generation(self, body: bytes, key: Any) -> JSONResponse | None:
        try:
            payload = json.loads(body)
        except ValueError:
            return None  # the route answers malformed JSON itself
        if not isinstance(payload, dict):
            return None
        model = payload.get("model")
        if key is not None and isinstance(model, str) and not key.may_use(model, self.base_name):
            return _error(f"The model `{model}` does not exist.", 404, "model_not_found", "model")
        n = payload.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > self.limits.max_n:
            message = f"invalid value for n: at most {self.limits.max_n} choices per request"
            return _error(message, 400, "invalid_value", "n")
        return None

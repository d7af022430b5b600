"""The FastAPI app: OpenAI routes, /health, /metrics, API-key check, request metrics, error shape."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Config
from server.errors import error_body, install_error_handlers
from server.metrics import Metrics, RequestMetricsMiddleware
from server.openai_routes import router as openai_router
from server.state import ServerState, get_state

PROTECTED_PREFIX = "/v1"


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/* when a key is configured; else 401."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a protected request without the right key; pass everything else on."""
        path = scope.get("path", "")
        protected = path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
        if self.expected is None or scope["type"] != "http" or not protected:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        body = error_body("Incorrect or missing API key.", 401, "invalid_api_key")
        await JSONResponse(body, status_code=401)(scope, receive, send)


def create_app(engine: Any, config: Config) -> FastAPI:
    """The HTTP app serving engine (an AsyncEngine, already started) under config."""
    app = FastAPI(title="loraplex", summary="OpenAI-compatible multi-LoRA server")
    metrics = Metrics(engine, engine.base.name)
    app.state.loraplex = ServerState(engine, config, metrics)
    install_error_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """200 while the server is up."""
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text exposition of this app's registry."""
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app

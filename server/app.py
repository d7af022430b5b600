"""The FastAPI app: OpenAI routes, the web console, /health, /metrics, the guard (keys, limits,
draining), errors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from loader.config import Config
from server.admin_routes import router as admin_router
from server.auth import KeyRing, load_keys
from server.console_routes import install_console
from server.errors import install_error_handlers
from server.guards import Drain, Guard, Limits
from server.metrics import Metrics, RequestMetricsMiddleware
from server.openai_routes import router as openai_router
from server.openapi import state_limits
from server.response_schemas import Health
from server.state import ServerState, get_state
from server.tokenize_routes import router as tokenize_router


def create_app(engine: Any, config: Config) -> FastAPI:
    """The HTTP app serving engine (an AsyncEngine, already started) under config."""
    app = FastAPI(
        title="loraplex",
        summary="OpenAI-compatible multi-LoRA server",
        generate_unique_id_function=lambda route: route.name,  # operationId: the handler's name
    )
    metrics = Metrics(engine, engine.base.name)
    app.state.loraplex = ServerState(engine, config, metrics)
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(tokenize_router)
    install_console(app)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Response:
        """200 while the engine's step loop runs; 503 with the reason once it has died (the
        process then exits non-zero, for a supervisor to restart it)."""
        if engine.dead is not None:
            return JSONResponse({"status": "dead", "reason": engine.dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text exposition of this app's registry."""
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    state_limits(app, config.max_n, len(engine.base.tokenizer))
    app.state.drain = Drain()
    limits = Limits(config.max_body_bytes, config.max_n)
    keys = KeyRing(load_keys(config))
    app.add_middleware(
        Guard, keys=keys, limits=limits, drain=app.state.drain, base_name=engine.base.name
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app

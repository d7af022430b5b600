"""The cluster's one HTTP entry: every request goes to one engine replica, chosen by the adapter it
names; admin calls, /metrics and /health go to all of them."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from loader.config import Config
from server.cluster.adapter_log import AdapterLog
from server.cluster.asgi import REPLICA_HEADER, ForwardedRequest, ResponseStart
from server.cluster.metrics import cluster_metrics
from server.errors import APIError
from server.responding import sse

log = logging.getLogger("loraplex.cluster")

FANOUT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 5.0
REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "Ingress"
EVENT_STREAM = b"text/event-stream"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # the replicas' app answers those


def replica_lost(error: BaseException) -> APIError:
    """The error of a request whose replica died or could not be reached (500 if the replica
    raised instead)."""
    if isinstance(error, RayTaskError):
        return APIError(
            f"the replica failed on this request: {error.cause!r}", 500, "replica_error"
        )
    return APIError(
        f"the replica serving this request failed ({type(error).__name__}); it is being "
        "restarted, retry the request",
        503,
        "replica_unavailable",
    )


def routed_model(request: ForwardedRequest) -> str | None:
    """The `model` a JSON POST body names, if any."""
    if request.method != "POST" or not request.body:
        return None
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


async def forwarded(request: Request, max_body_bytes: int) -> ForwardedRequest:
    """The ingress's request as a ForwardedRequest. A body over max_body_bytes is not read: the
    request goes on without it, declaring its size, and the replica's guard refuses it as
    `loraplex serve` does (after the API key check, 413)."""
    client = (request.client.host, request.client.port) if request.client else None
    path, prefix = request.url.path, request.scope.get("root_path", "")
    if prefix and path.startswith(prefix):  # deployed under a route prefix: the app's own path
        path = path[len(prefix) :] or "/"
    headers = list(request.headers.raw)
    body, size = b"", 0
    declared = request.headers.get("content-length", "")
    if not (declared.isdigit() and int(declared) > max_body_bytes):
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(size).encode()))
                chunks = []
                break
            chunks.append(chunk)
        body = b"".join(chunks)
    return ForwardedRequest(request.method, path, request.url.query.encode(), headers, body, client)


def as_response(start: ResponseStart, body: bytes) -> Response:
    """A replica's whole response, headers as it sent them."""
    response = Response(body, status_code=start.status)
    response.raw_headers = list(start.headers)
    return response


def replica_of(start: ResponseStart) -> str:
    """The id of the replica that sent a response."""
    return dict(start.headers).get(REPLICA_HEADER.encode(), b"?").decode()


def replica_states() -> dict[str, int]:
    """How many engine replicas of this application are in each state (RUNNING, STARTING, ...),
    from Ray Serve."""
    application = serve.status().applications.get(serve.get_replica_context().app_name)
    deployment = application.deployments.get(REPLICA_DEPLOYMENT) if application else None
    if deployment is None:
        return {}
    return {str(state): count for state, count in deployment.replica_states.items()}


async def rest_of(stream: DeploymentResponseGenerator, events: bool) -> AsyncIterator[bytes]:
    """The body chunks after the start; if the replica dies meanwhile, an SSE stream ends with an
    error event (a plain body just ends); a client that goes away cancels the replica's work."""
    try:
        async for chunk in stream:
            yield chunk
    except RayError as error:
        log.warning("replica died while streaming: %r", error)
        if events:  # as `loraplex serve` ends a stream whose engine failed
            yield sse(replica_lost(error).body()).encode()
            yield b"data: [DONE]\n\n"
    finally:
        stream.cancel()


@serve.ingress(app)
class Ingress:
    """Forwards the OpenAI API to the engine replicas (adapter affinity: the adapter's name is the
    multiplexed model id) and keeps the log of adapters loaded and unloaded at runtime."""

    def __init__(self, replicas: DeploymentHandle, config: Config) -> None:
        self.replicas = replicas
        self.config = config
        self.base_name: str | None = None
        self.adapters = AdapterLog()

    def adapter_log(self) -> list[ForwardedRequest]:
        """The admin calls a starting replica replays (AdapterLog)."""
        return self.adapters.replay()

    async def _base_name(self) -> str:
        if self.base_name is None:
            self.base_name = (await self.replicas.describe.remote())["base"]
        return self.base_name

    async def _model_id(self, request: ForwardedRequest) -> str:
        """The multiplexed model id to route request by: the adapter it names ("" for the base,
        no model, or with affinity off)."""
        model = routed_model(request)
        if not self.config.affinity or model is None or model == await self._base_name():
            return ""
        return model

    async def _fanout(
        self, request: ForwardedRequest, timeout_s: float
    ) -> list[tuple[ResponseStart, bytes] | BaseException]:
        """Every live replica's whole response to request (or what went wrong with it)."""
        broadcast = self.replicas.broadcast("respond", request)
        return await broadcast.results_async(timeout_s=timeout_s, return_exceptions=True)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while every replica Ray Serve targets is running and answers healthy ("degraded"
        while one is down or restarting, still 200 if any serves); 503 when none does."""
        replicas = await self._replica_health()
        healthy = [r for r in replicas if r.get("status") == "ok"]
        states = await asyncio.to_thread(replica_states)
        running = states.get("RUNNING", 0)
        target = sum(states.values())
        status = "ok" if healthy and len(healthy) == running == target else "degraded"
        body = {"status": status if healthy else "unavailable", "replicas": replicas}
        body["replica_states"] = states
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def _replica_health(self) -> list[dict[str, Any]]:
        broadcast = self.replicas.broadcast("describe")
        try:
            answers = await broadcast.results_async(
                timeout_s=HEALTH_TIMEOUT_S, return_exceptions=True
            )
        except TimeoutError:
            return []
        return [
            {"status": "unreachable", "reason": repr(answer)}
            if isinstance(answer, BaseException)
            else answer
            for answer in answers
        ]

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Every replica's /metrics series with a `replica` label, plus the replica counts."""
        answers = await self._fanout(
            await forwarded(request, self.config.max_body_bytes), FANOUT_TIMEOUT_S
        )
        texts = {
            replica_of(answer[0]): answer[1].decode()
            for answer in answers
            if not isinstance(answer, BaseException) and answer[0].status == 200
        }
        return Response(
            cluster_metrics(texts, await asyncio.to_thread(replica_states)),
            media_type=CONTENT_TYPE_LATEST,
        )

    @app.post("/v1/load_lora_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def admin(self, request: Request) -> Response:
        """Load or unload an adapter on every replica (each checks the key and the adapter as
        `loraplex serve` does); the first refusal is the answer. What every replica applied is
        logged for replicas that start later."""
        call = await forwarded(request, self.config.max_body_bytes)
        answers = await self._fanout(call, FANOUT_TIMEOUT_S)
        for answer in answers:
            if isinstance(answer, BaseException):
                return replica_lost(answer).response()
        if not answers:
            return APIError("no engine replica is running", 503, "replica_unavailable").response()
        refused = [answer for answer in answers if answer[0].status >= 400]
        if refused:
            return as_response(*refused[0])
        self.adapters.record(call)
        return as_response(*answers[0])

    @app.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request) -> Response:
        """Any other route: answered by one replica, streamed through as it produces it."""
        call = await forwarded(request, self.config.max_body_bytes)
        try:
            handle = self.replicas.options(
                stream=True, multiplexed_model_id=await self._model_id(call)
            )
            stream: DeploymentResponseGenerator = handle.handle.remote(call)
            start = await stream.__anext__()
        except BackPressureError:
            return APIError(
                "the cluster's queue is full; retry later", 429, "overloaded"
            ).response()
        except (RayError, asyncio.TimeoutError) as error:
            log.warning("%s %s: replica failed before answering: %r", call.method, call.path, error)
            return replica_lost(error).response()
        events = dict(start.headers).get(b"content-type", b"").startswith(EVENT_STREAM)
        response = StreamingResponse(rest_of(stream, events), status_code=start.status)
        response.raw_headers = list(start.headers)
        return response

"""One HTTP request carried across a Ray call: what the ingress received, replayed into a
replica's ASGI app, its response coming back as a start message and body chunks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

REPLICA_HEADER = "x-loraplex-replica"  # names the replica that answered


@dataclass
class ForwardedRequest:
    """An HTTP request as the ingress read it (picklable, body in full)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        """The ASGI HTTP scope of this request."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query,
            "headers": self.headers,
            "client": self.client,
            "server": None,
        }


@dataclass
class ResponseStart:
    """The status and headers of a response, sent before its body chunks."""

    status: int
    headers: list[tuple[bytes, bytes]]


async def call_app(
    app: ASGIApp, request: ForwardedRequest, extra_headers: list[tuple[bytes, bytes]]
) -> AsyncIterator[ResponseStart | bytes]:
    """Run request through app: its ResponseStart (with extra_headers added), then each non-empty
    body chunk. Closing the iterator early tells the app the client disconnected."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *extra_headers]
                yield ResponseStart(message["status"], headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
        if not task.done():
            task.cancel()

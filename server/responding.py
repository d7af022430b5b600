"""Answer a started Generation: one JSON body, or an SSE stream (`data: {...}` ... `data: [DONE]`).

Either way a client that goes away aborts the generation's engine requests at once: the stream through
Starlette's disconnect listener (which cancels the body iterator), the JSON answer through a watcher on
the ASGI receive channel.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.formatting import ResponseFormat, usage
from server.generation import Generation, engine_error

CLIENT_CLOSED_REQUEST = 499
T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_events(gen: Generation, fmt: ResponseFormat) -> AsyncIterator[str]:
    """The SSE events of a streamed response, ending with `data: [DONE]`."""
    try:
        for chunk in fmt.opening_chunks():
            yield sse(chunk)
        async for delta in gen.deltas():
            if delta.finish_reason == "error":
                yield sse(engine_error(delta.error, delta.error_code).body())
                break
            chunk = fmt.chunk(delta)
            if chunk is not None:
                yield sse(chunk)
        else:
            if fmt.stream_usage:
                yield sse(
                    fmt.usage_chunk(
                        usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)
                    )
                )
        yield "data: [DONE]\n\n"
    finally:
        gen.close()


async def collect(gen: Generation, fmt: ResponseFormat) -> dict[str, Any]:
    """The whole response body once every choice has finished."""
    try:
        async for delta in gen.deltas():
            if delta.finish_reason == "error":
                raise engine_error(delta.error, delta.error_code)
            fmt.add(delta)
        return fmt.response(usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens))
    finally:
        gen.close()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, gen: Generation, coro: Awaitable[T]) -> T | None:
    """coro's result, or None (with the generation aborted) if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            gen.close()
    if not work.done() or work.cancelled():
        return None
    return work.result()


async def respond(request: Request, gen: Generation, fmt: ResponseFormat, stream: bool) -> Response:
    """Start the generation (raising refusals as HTTP errors) and answer it."""
    if not await _unless_disconnected(request, gen, _started(gen)):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if stream:
        return StreamingResponse(
            stream_events(gen, fmt), media_type="text/event-stream", headers=SSE_HEADERS
        )
    body = await _unless_disconnected(request, gen, collect(gen, fmt))
    if body is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(body)


async def _started(gen: Generation) -> bool:
    await gen.start()
    return True

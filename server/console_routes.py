"""The web console: the static page at /ui (server/ui/: HTML, CSS and JavaScript, no build step) and
the JSON it reads that no other route gives, GET /v1/adapters (per-model counters, the key's role).

The page is public like any static file; every data call it makes carries the API key the user
typed, so a key sees and may do in the console exactly what it may do through the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from server.auth import current_key, may_use
from server.openai_routes import adapter_memory
from server.response_schemas import AdapterUsageList, documented
from server.state import get_state

UI_DIR = Path(__file__).parent / "ui"

router = APIRouter()


@router.get("/ui", include_in_schema=False)
async def console_page() -> FileResponse:
    """The console's page (its scripts and styles are served under /ui/)."""
    return FileResponse(UI_DIR / "index.html")


@router.get("/v1/adapters", responses=documented(AdapterUsageList, 401, 503))
async def adapter_usage(request: Request) -> dict[str, Any]:
    """The base and every adapter the key may use: rank, tier (device, host or disk), weight bytes,
    generation requests and generated tokens since the server started; the key's role; the
    device's adapter memory."""
    st = get_state(request)
    usage = st.metrics.usage
    base = {"id": st.base_name, "parent": None, "rank": None, "tier": None, "bytes": None}
    rows = [base] + [
        {"id": name, "parent": st.base_name, **{k: info[k] for k in ("rank", "tier", "bytes")}}
        for name, info in st.engine.adapter_info().items()
        if may_use(request, name, st.base_name)
    ]
    for row in rows:
        row["requests"] = usage.requests[row["id"]]
        row["generated_tokens"] = usage.generated_tokens[row["id"]]
    stats = st.engine.stats()
    device = {"resident_adapters": stats.resident_adapters, **adapter_memory(stats)}
    return {"object": "list", "role": current_key(request).role, "data": rows, "device": device}


def install_console(app: FastAPI) -> None:
    """Serve the console page at /ui and its files under /ui/, plus GET /v1/adapters."""
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="console")

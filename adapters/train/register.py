"""Load a finished adapter into a running server through its vLLM-shaped admin route."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

LOAD_ROUTE = "/v1/load_lora_adapter"


def register_adapter(
    url: str, name: str, path: Path, api_key: str | None = None, timeout: float = 60.0
) -> dict | str:
    """POST {url}/v1/load_lora_adapter {"lora_name", "lora_path"}; the server's reply, or RuntimeError."""
    body = json.dumps({"lora_name": name, "lora_path": str(Path(path).absolute())}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url.rstrip("/") + LOAD_ROUTE, data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise RuntimeError(
            f"{url} refused adapter {name!r}: HTTP {error.code}: {detail}"
        ) from error
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"cannot reach {url} to register {name!r}: {error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text

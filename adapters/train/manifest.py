"""The adapter manifest (loraplex_manifest.json) and the base fingerprint it records.

The fingerprint identifies the exact served base: a hash of its config.json content plus the
quantization settings. The server compares it with the base it runs before serving an adapter.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from loader.model import BaseModel

MANIFEST_NAME = "loraplex_manifest.json"
MANIFEST_FORMAT = "loraplex-adapter-manifest/1"
FINGERPRINT_KEYS = ("config_sha256", "quant", "double_quant", "compute_dtype")


def config_sha256(model_dir: Path) -> str:
    """sha256 of a checkpoint's config.json content (canonical JSON, so formatting does not count)."""
    content = json.loads((Path(model_dir) / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version"):
        content.pop(volatile, None)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def base_fingerprint(base: BaseModel) -> dict[str, Any]:
    """What identifies the served base: source, config hash, architecture and quantization."""
    config = base.config
    return {
        "source": config.model,
        "name": base.name,
        "architecture": type(base.model).__name__,
        "config_sha256": config_sha256(base.path),
        "quant": config.quant,
        "double_quant": config.double_quant if config.quant != "none" else None,
        "compute_dtype": config.compute_dtype,
    }


def fingerprint_mismatches(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a manifest's fingerprint and the running base's."""
    return [
        f"{key}: adapter trained on {recorded.get(key)!r}, base has {current.get(key)!r}"
        for key in FINGERPRINT_KEYS
        if recorded.get(key) != current.get(key)
    ]


def versions() -> dict[str, str]:
    """Versions of loraplex and the libraries that shape the adapter."""
    out = {"python": platform.python_version()}
    for dist in ("loraplex", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def build_manifest(
    fingerprint: dict[str, Any],
    data: dict[str, Any],
    hyperparameters: dict[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """The manifest document."""
    return {
        "format": MANIFEST_FORMAT,
        "loraplex_version": versions()["loraplex"],
        "versions": versions(),
        "base": fingerprint,
        "data": data,
        "hyperparameters": hyperparameters,
        "results": results,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest into an adapter folder."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an adapter folder, or None when it has none (e.g. not trained by loraplex)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())

"""Resolve a base-model source (local folder, hub id or `demo`) to a local checkpoint folder."""

from __future__ import annotations

import re
from pathlib import Path

from loader.demo import prepare_demo
from loader.errors import ModelSourceError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str) -> Path:
    """A local folder holding config.json for `source`, downloading or converting it if needed."""
    if source == "demo":
        return prepare_demo()
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or not HUB_ID.match(source)
    if looks_local:
        if not path.is_dir():
            raise ModelSourceError(f"model folder not found: {path}")
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path} has no config.json: pass a Hugging Face checkpoint folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        return path
    return _from_hub(source)


def _from_hub(repo_id: str) -> Path:
    """Download (or reuse from the HF cache) the checkpoint files of a hub model."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as online_error:  # noqa: BLE001 - any hub failure falls back to the cache
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise ModelSourceError(
                f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(online_error).__name__}: "
                "no network, or the id does not exist) and it is not in the local HF cache. "
                "Download it elsewhere and pass the local checkpoint folder: --model /path/to/model"
            ) from online_error

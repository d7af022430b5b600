"""Adapter name rules and the check that an adapter path stays inside the allowed folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from adapters.errors import AdapterError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_name(name: str, base_id: str) -> str:
    """The name, if valid: 1 to 64 of [A-Za-z0-9._-], neither "." nor "..", nor the base's id."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 . _ -",
            "invalid_adapter_name",
        )
    if name in (".", ".."):
        raise AdapterError(f"invalid adapter name {name!r}", "invalid_adapter_name")
    if name == base_id:
        raise AdapterError(
            f"invalid adapter name {name!r}: it is the base model's id", "invalid_adapter_name"
        )
    return name


def resolve_inside(path: str | Path, roots: list[Path]) -> Path:
    """The real path (symlinks and .. resolved; relative paths from the working directory), if it
    lies inside one of the roots."""
    try:
        real = Path(os.path.realpath(path))
        real_roots = [Path(os.path.realpath(root)) for root in roots]
    except (OSError, ValueError, TypeError) as error:
        raise AdapterError(
            f"adapter path {path!r} cannot be resolved: {error}", "adapter_path_forbidden"
        ) from error
    for root in real_roots:
        if real == root or root in real.parents:
            return real
    allowed = ", ".join(str(root) for root in real_roots) or "none configured"
    raise AdapterError(
        f"adapter path {str(path)!r} resolves to {str(real)!r}, outside the allowed adapter "
        f"folders ({allowed})",
        "adapter_path_forbidden",
    )

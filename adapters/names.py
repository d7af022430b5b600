"""Adapter name rules and the check that an adapter path stays inside the allowed folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from adapters.errors import AdapterError

# 1 to 64 of [A-Za-z0-9._-], not starting with "." (so never "." or ".."; hidden folders are not
# adapters); the JSON Schema pattern of the adapter routes' names
NAME_REGEX = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
NAME_PATTERN = re.compile(NAME_REGEX)


def validate_name(name: str, base_id: str) -> str:
    """The name, if valid: NAME_REGEX, and not the base's id."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 . _ -, "
            "not starting with '.'",
            "invalid_adapter_name",
        )
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

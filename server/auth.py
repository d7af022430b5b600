"""API keys: who a request is (from `Authorization: Bearer <key>`), which models it may use, admin rights.

Keys come from `--api-key` (one admin key allowed every model) and/or `--api-keys-file`, a JSON list of
`{"key": "...", "role": "user"|"admin", "adapters": ["a", "b"] | "*"}`. With no key configured every
request is anonymous and allowed everything. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from loader.config import Config, ConfigError
from server.errors import APIError

ROLES = ("user", "admin")
SCOPE_KEY = "loraplex.api_key"


@dataclass(frozen=True)
class ApiKey:
    """One API key: its role and the adapters it may use (None: all of them)."""

    key: str = field(repr=False)
    role: str = "user"
    adapters: frozenset[str] | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this key may load and unload adapters."""
        return self.role == "admin"

    def may_use(self, model: str, base_name: str) -> bool:
        """Whether this key may run `model` (the base is open to every key)."""
        return model == base_name or self.adapters is None or model in self.adapters


ANONYMOUS = ApiKey(key="", role="admin", adapters=None)


def parse_keys(entries: Any, source: str) -> list[ApiKey]:
    """The keys of a keys-file's JSON content; ConfigError naming the first bad entry."""
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: expected a JSON list of key objects")
    keys = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ConfigError(f"{source}: entry {i} needs a non-empty string 'key'")
        role = entry.get("role", "user")
        if role not in ROLES:
            raise ConfigError(f"{source}: entry {i}: role must be one of {ROLES}")
        adapters = entry.get("adapters", "*")
        if adapters == "*":
            allowed = None
        elif isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
            allowed = frozenset(adapters)
        else:
            raise ConfigError(f"{source}: entry {i}: adapters must be '*' or a list of names")
        keys.append(ApiKey(entry["key"], role, allowed))
    return keys


def load_keys(config: Config) -> list[ApiKey]:
    """Every configured key: `api_key` (admin, all adapters) plus the keys file's entries."""
    keys = [ApiKey(config.api_key, "admin", None)] if config.api_key else []
    path = getattr(config, "api_keys_file", None)
    if path:
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"--api-keys-file {path}: {error}") from None
        keys.extend(parse_keys(entries, f"--api-keys-file {path}"))
    return keys


class KeyRing:
    """The configured keys; identifies the key behind an Authorization header."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self._tokens = [f"Bearer {k.key}".encode() for k in keys]

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key."""
        return bool(self.keys)

    def identify(self, authorization: bytes) -> ApiKey | None:
        """The key matching the header, comparing against every key in constant time; else None."""
        found = None
        for key, token in zip(self.keys, self._tokens, strict=True):
            if hmac.compare_digest(authorization, token) and found is None:
                found = key
        return found


def current_key(request: Request) -> ApiKey:
    """The key the request authenticated with (ANONYMOUS when no keys are configured)."""
    return request.scope.get(SCOPE_KEY, ANONYMOUS)


def may_use(request: Request, model: str, base_name: str) -> bool:
    """Whether the request's key may run or list `model`."""
    return current_key(request).may_use(model, base_name)


async def require_admin(request: Request) -> None:
    """FastAPI dependency: 403 unless the request's key has the admin role."""
    if not current_key(request).is_admin:
        raise APIError("This operation needs an admin API key.", 403, "permission_denied")

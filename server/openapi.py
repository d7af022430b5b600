"""The app's OpenAPI document with the limits this server runs under (--max-n, the vocabulary), so
that a client generated from it sends only what validation accepts."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

GENERATION_REQUESTS = ("CompletionRequest", "ChatCompletionRequest")


def _integer_branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The integer-typed subschemas of a property (through anyOf and array items)."""
    if schema.get("type") == "integer":
        return [schema]
    found = []
    for branch in schema.get("anyOf", []):
        found += _integer_branches(branch)
    if isinstance(schema.get("items"), dict):
        found += _integer_branches(schema["items"])
    return found


def _cap(request: dict[str, Any], field: str, maximum: int) -> None:
    """Lower the maximum of every integer branch of request's field to maximum."""
    for branch in _integer_branches(request["properties"].get(field, {})):
        branch["maximum"] = min(branch.get("maximum", maximum), maximum)


def state_limits(app: FastAPI, max_n: int, vocab_size: int) -> None:
    """Make app.openapi() state n <= max_n and token ids (prompts, stop_token_ids, /detokenize)
    in [0, vocab_size)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = generate()["components"]["schemas"]
            for name in GENERATION_REQUESTS:
                request = components[name]
                _cap(request, "n", max_n)
                _cap(request, "stop_token_ids", vocab_size - 1)
            _cap(components["CompletionRequest"], "prompt", vocab_size - 1)
            _cap(components["DetokenizeRequest"], "tokens", vocab_size - 1)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

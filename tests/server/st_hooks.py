"""schemathesis hooks for the fuzz runs (`SCHEMATHESIS_HOOKS=<this file> st run ...
--exclude-checks positive_data_acceptance`): a schema-valid request must be accepted, or refused
with a 400 whose code is one of server.errors.RUNTIME_RULES, the rules no JSON Schema can state
(the OpenAPI document lists them on the generation routes' 400)."""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.errors import RUNTIME_RULES


def error_code(response: object) -> str | None:
    """The OpenAI error code of a response, None if it has none."""
    try:
        return json.loads(response.content)["error"]["code"]  # type: ignore[attr-defined]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def accepted_unless_runtime_rule(ctx, response, case) -> bool | None:  # noqa: ANN001
    """positive_data_acceptance, except for 400s naming a documented runtime rule."""
    if response.status_code == 400 and error_code(response) in RUNTIME_RULES:
        return None
    return positive_data_acceptance(ctx, response, case)

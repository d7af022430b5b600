"""OpenAI-shaped errors: the APIError exception, the JSON body, and the app's exception handlers."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterError
from server.engine.types import EngineError
from server.schemas import MAX_CHOICES

log = logging.getLogger("loraplex.http")

# adapter refusals that are not about the request's shape: a missing folder, one outside the allowed
# roots, a name already loaded (everything else, e.g. bad weights, is a 400)
ADAPTER_ERROR_STATUS = {
    "adapter_not_found": 404,
    "adapter_path_forbidden": 403,
    "adapter_exists": 409,
}
# the member tags pydantic puts in an error's loc for union-typed fields: "constrained-str",
# "list[constrained-str]", "int", "function-after[...]"
UNION_MEMBER = re.compile(r"^(constrained-\w+|str|int|float|bool|[\w-]+\[.*\])$")
# 400 refusals of schema-valid requests: the rules no JSON Schema can state, by error code (the
# OpenAPI document lists them on every generation route's 400)
RUNTIME_RULES = {
    "context_length_exceeded": "a prompt that fills the model's context (max_tokens only caps)",
    "empty_prompt": "a text prompt that encodes to no tokens",
    "too_many_choices": f"more than {MAX_CHOICES} choices (prompts x n)",
    "invalid_grammar": "a JSON schema, regex, grammar or tool set that cannot be compiled",
    "unsupported_schema": "a JSON schema keyword structured outputs cannot enforce",
    "grammar_too_large": "a grammar over --max-grammar-bytes",
    "grammar_too_complex": "a grammar that does not compile within --grammar-compile-timeout-s",
    "unknown_tool": "a tool_choice naming a function that is not in tools",
    "template_rejected": "messages the model's chat template refuses (for example role order)",
    "token_out_of_vocabulary": "a logit_bias key that is not a token id of the model",
    "min_tokens_above_max_tokens": "min_tokens above max_tokens (or the context left)",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client with an HTTP status and OpenAI's error body."""

    def __init__(
        self, message: str, status: int = 400, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's `{"error": {...}}` body for this error."""
        return error_body(self.message, self.status, self.code, self.param)

    def response(self) -> JSONResponse:
        """This error as a JSON response."""
        retry = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=retry)


def error_body(
    message: str, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` with the type that matches the status."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_engine_error(error: EngineError) -> APIError:
    """The API error for an engine refusal (unknown adapter, context too long, overloaded)."""
    param = "model" if error.code == "model_not_found" else None
    return APIError(str(error), error.status, error.code, param)


def from_validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first offending field of a request that failed schema validation."""
    details = error.errors()
    if not details:
        return APIError("invalid request", 400, "invalid_request")
    first = details[0]
    # a bad mapping key is named by its path (pydantic adds a "[key]" part)
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "[key]")]
    # name the field, not the union member
    loc = loc[: next((i for i, part in enumerate(loc) if UNION_MEMBER.match(part)), len(loc))]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return APIError(
            f"Unrecognized request argument supplied: {param}", 400, "unsupported_parameter", param
        )
    if kind in ("json_invalid", "model_attributes_type") or (not loc and kind == "dict_type"):
        return APIError("the request body must be a JSON object", 400, "invalid_json", None)
    if kind == "missing":
        return APIError(f"missing required parameter: {param}", 400, "missing_parameter", param)
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return APIError(f"invalid value for {param}: {message}", 400, "invalid_value", param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's error shape; user input never produces a 500."""

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return from_validation_error(error).response()

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, error: EngineError) -> JSONResponse:
        return from_engine_error(error).response()

    @app.exception_handler(AdapterError)
    async def on_adapter_error(request: Request, error: AdapterError) -> JSONResponse:
        status = ADAPTER_ERROR_STATUS.get(error.code, 400)
        return APIError(str(error), status, error.code).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(
            error_body(str(error.detail), error.status_code, code),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal server error", 500, "internal_error"), status_code=500
        )

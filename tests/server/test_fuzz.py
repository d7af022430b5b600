"""Schema fuzzing (schemathesis) of /v1/* and /health against a real server on 127.0.0.1: bounded
examples per operation; no 5xx, every status, content type and body as the OpenAPI schema documents
it (server/response_schemas.py), and every error in OpenAI's `{"error": {...}}` shape."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

MAX_EXAMPLES = 15


def fuzz_operation(operation, base_url: str, seen: list[str]) -> None:
    """Run MAX_EXAMPLES generated cases of one operation; raise on the first bad response."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case) -> None:
        response = case.call(base_url=base_url, timeout=60)
        seen.append(f"{case.method} {case.path} -> {response.status_code}")
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error

    run()


def valid_requests(url: str) -> dict[tuple[str, str], object]:
    """One well-formed request per generation route and the listing routes, on the served base."""
    import httpx

    base = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    few = {"model": base, "max_tokens": 3, "temperature": 0}
    chat = [{"role": "user", "content": "Hi"}]
    return {
        ("GET", "/health"): None,
        ("GET", "/v1/models"): None,
        ("POST", "/v1/completions"): {**few, "prompt": "Hello", "logprobs": 2},
        ("POST", "/v1/chat/completions"): {
            **few,
            "messages": chat,
            "logprobs": True,
            "top_logprobs": 2,
        },
    }


def test_fuzz_no_5xx_and_openai_errors(launch_server, demo_path: Path, tmp_path: Path) -> None:
    args = ["--model", str(demo_path), "--max-model-len", "48", "--request-timeout-s", "4"]
    with launch_server(args, tmp_path / "server.log") as running:
        schema = schemathesis.openapi.from_url(running.url + "/openapi.json")
        schema = schema.include(path_regex=r"^/(v1/|health)")
        seen: list[str] = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 5
        for operation in operations:
            fuzz_operation(operation, running.url, seen)
        # random bodies rarely name the served model: valid requests check the 200 bodies too
        by_path = {(op.method.upper(), op.path): op for op in operations}
        for (method, path), body in valid_requests(running.url).items():
            case = by_path[(method, path)].Case(body=body, media_type="application/json")
            response = case.call(base_url=running.url, timeout=60)
            assert response.status_code == 200, response.text
            case.validate_response(response, checks=CHECKS)
            seen.append(f"{method} {path} (valid) -> 200")
    assert len(seen) >= 5 * 3
    (tmp_path / "cases.txt").write_text("\n".join(seen))

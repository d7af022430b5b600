"""Schema fuzzing (schemathesis) of /v1/* and /health against a real server on 127.0.0.1: bounded
examples per operation; no 5xx, and every error in OpenAI's `{"error": {...}}` shape."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

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
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error

    run()


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
    assert len(seen) >= 5 * 3
    (tmp_path / "cases.txt").write_text("\n".join(seen))

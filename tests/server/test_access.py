"""Access control and request limits on the real app over the fake engine: keys, roles, per-key adapters,
body size, n, overload and draining answers, each in OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

from server.auth import KeyRing, parse_keys
from server.config import ConfigError

BASE = "fake-base"
KEYS = [
    {"key": "admin-key", "role": "admin", "adapters": "*"},
    {"key": "user-key", "role": "user", "adapters": ["ad1"]},
    {"key": "base-only", "role": "user", "adapters": []},
]


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


@pytest.fixture
def keyed(fake_engine, fake_client_with, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    return fake_client_with(fake_engine, api_keys_file=str(path), max_body_bytes=4096, max_n=2)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def models(client, key: str) -> list[str]:
    response = client.get("/v1/models", headers=auth(key))
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


def test_models_list_only_what_the_key_may_use(keyed):
    assert models(keyed, "admin-key") == [BASE, "ad1"]
    assert models(keyed, "user-key") == [BASE, "ad1"]
    assert models(keyed, "base-only") == [BASE]
    error_of(keyed.get("/v1/models", headers=auth("wrong")), 401, "invalid_api_key")
    error_of(keyed.get("/v1/models"), 401, "invalid_api_key")
    assert keyed.get("/health").status_code == 200


def test_forbidden_adapter_is_the_same_404_as_an_unknown_one(keyed):
    body = {"model": "ad1", "prompt": "x", "max_tokens": 2}
    forbidden = keyed.post("/v1/completions", json=body, headers=auth("base-only"))
    unknown = keyed.post(
        "/v1/completions", json={**body, "model": "nope"}, headers=auth("admin-key")
    )
    a, b = error_of(forbidden, 404, "model_not_found"), error_of(unknown, 404, "model_not_found")
    assert a["message"].replace("ad1", "X") == b["message"].replace("nope", "X")
    assert a["param"] == b["param"] == "model"
    ok = keyed.post("/v1/completions", json=body, headers=auth("user-key"))
    assert ok.status_code == 200, ok.text
    base = keyed.post("/v1/completions", json={**body, "model": BASE}, headers=auth("base-only"))
    assert base.status_code == 200, base.text


def test_admin_routes_need_an_admin_key(keyed):
    body = {"lora_name": "x", "lora_path": "/nowhere"}
    for key in ("user-key", "base-only"):
        response = keyed.post("/v1/load_lora_adapter", json=body, headers=auth(key))
        error_of(response, 403, "permission_denied")
        response = keyed.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=auth(key))
        error_of(response, 403, "permission_denied")
    response = keyed.post(
        "/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=auth("admin-key")
    )
    assert response.status_code != 403


def test_body_size_and_n_limits(keyed):
    big = {"model": BASE, "prompt": "x" * 8000, "max_tokens": 2}
    error_of(
        keyed.post("/v1/completions", json=big, headers=auth("admin-key")), 413, "request_too_large"
    )
    chunked = keyed.post(
        "/v1/completions",
        content=iter([b'{"model": "fake-base", "prompt": "', b"x" * 5000, b'"}']),
        headers={**auth("admin-key"), "Content-Type": "application/json"},
    )
    error_of(chunked, 413, "request_too_large")
    many = {"model": BASE, "prompt": "x", "max_tokens": 2, "n": 3}
    error = error_of(
        keyed.post("/v1/completions", json=many, headers=auth("admin-key")), 400, "invalid_value"
    )
    assert error["param"] == "n"


def test_overload_is_429_with_retry_after(fake_engine, fake_client):
    fake_engine.overloaded = True
    response = fake_client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
    error_of(response, 429, "overloaded")
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "1"


def test_draining_server_answers_503(fake_client):
    fake_client.app.state.drain.draining = True
    response = fake_client.post("/v1/completions", json={"model": BASE, "prompt": "x"})
    error_of(response, 503, "shutting_down")
    assert response.headers["retry-after"] == "1"


def test_key_ring_matches_only_exact_keys():
    ring = KeyRing(parse_keys(KEYS, "test"))
    assert ring.identify(b"Bearer user-key").role == "user"
    assert ring.identify(b"Bearer user-ke") is None and ring.identify(b"") is None
    assert "user-key" not in repr(ring.keys)


@pytest.mark.parametrize(
    "entries",
    [{}, [{"key": ""}], [{"key": "k", "role": "root"}], [{"key": "k", "adapters": "a"}]],
)
def test_bad_keys_files_are_refused(entries):
    with pytest.raises(ConfigError):
        parse_keys(entries, "keys.json")

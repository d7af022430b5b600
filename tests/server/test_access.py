"""Access control and request limits on a real `loraplex serve` (demo model, test PEFT adapters):
keys, roles, per-key adapters, body size and n, each in OpenAI's error shape; keys never logged."""

from __future__ import annotations

import httpx
import pytest

from loader.config import ConfigError
from server.auth import KeyRing, parse_keys

KEYS = [
    {"key": "admin-key", "role": "admin", "adapters": "*"},
    {"key": "user-key", "role": "user", "adapters": ["ad1"]},
]


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


@pytest.fixture(scope="module")
def http(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=120) as client:
        yield client


def auth(srv, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.keys[role]}"}


def models(http, srv, role: str) -> list[str]:
    response = http.get("/v1/models", headers=auth(srv, role))
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


def test_models_list_only_what_the_key_may_use(http, keyed_server, peft_adapters):
    srv = keyed_server
    admin = models(http, srv, "admin")
    assert admin[0] == srv.base and set(peft_adapters) <= set(admin[1:])
    assert models(http, srv, "user") == [srv.base, srv.user_adapter]
    assert models(http, srv, "base_only") == [srv.base]
    wrong = {"Authorization": "Bearer sk-wrong-000"}
    error_of(http.get("/v1/models", headers=wrong), 401, "invalid_api_key")
    error_of(http.get("/v1/models"), 401, "invalid_api_key")
    body = {"model": srv.base, "prompt": "x", "max_tokens": 1}
    error_of(http.post("/v1/completions", json=body), 401, "invalid_api_key")
    assert http.get("/health").status_code == 200


def test_forbidden_adapter_is_the_same_404_as_an_unknown_one(http, keyed_server, peft_adapters):
    srv = keyed_server
    other = next(name for name in sorted(peft_adapters) if name != srv.user_adapter)
    body = {"model": other, "prompt": "Hello", "max_tokens": 2}
    forbidden = http.post("/v1/completions", json=body, headers=auth(srv, "user"))
    unknown = http.post(
        "/v1/completions", json={**body, "model": "nope"}, headers=auth(srv, "admin")
    )
    a, b = error_of(forbidden, 404, "model_not_found"), error_of(unknown, 404, "model_not_found")
    assert a["message"].replace(other, "X") == b["message"].replace("nope", "X")
    assert a["param"] == b["param"] == "model"
    mine = {**body, "model": srv.user_adapter}
    error_of(
        http.post("/v1/completions", json=mine, headers=auth(srv, "base_only")),
        404,
        "model_not_found",
    )
    ok = http.post("/v1/completions", json=mine, headers=auth(srv, "user"))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] <= 2
    admin = http.post("/v1/completions", json=body, headers=auth(srv, "admin"))
    assert admin.status_code == 200, admin.text
    base = {**body, "model": srv.base}
    assert (
        http.post("/v1/completions", json=base, headers=auth(srv, "base_only")).status_code == 200
    )


def test_retrieve_and_tokenize_see_what_the_key_may_use(http, keyed_server, peft_adapters):
    srv = keyed_server
    other = next(name for name in sorted(peft_adapters) if name != srv.user_adapter)
    mine = http.get(f"/v1/models/{srv.user_adapter}", headers=auth(srv, "user"))
    assert mine.status_code == 200, mine.text
    assert mine.json()["id"] == srv.user_adapter and mine.json()["parent"] == srv.base
    error_of(http.get(f"/v1/models/{other}", headers=auth(srv, "user")), 404, "model_not_found")
    assert http.get(f"/v1/models/{other}", headers=auth(srv, "admin")).status_code == 200
    error_of(http.get(f"/v1/models/{srv.base}"), 401, "invalid_api_key")
    error_of(http.post("/tokenize", json={"prompt": "hi"}), 401, "invalid_api_key")
    error_of(http.post("/detokenize", json={"tokens": [1]}), 401, "invalid_api_key")
    theirs = {"prompt": "hi", "model": other}
    error_of(http.post("/tokenize", json=theirs, headers=auth(srv, "user")), 404, "model_not_found")
    ours = {"prompt": "hi", "model": srv.user_adapter}
    assert http.post("/tokenize", json=ours, headers=auth(srv, "user")).status_code == 200


def test_admin_routes_need_an_admin_key(http, keyed_server):
    srv = keyed_server
    body = {"lora_name": "x", "lora_path": "/nowhere"}
    for role in ("user", "base_only"):
        response = http.post("/v1/load_lora_adapter", json=body, headers=auth(srv, role))
        error_of(response, 403, "permission_denied")
        response = http.post(
            "/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=auth(srv, role)
        )
        error_of(response, 403, "permission_denied")
    response = http.post(
        "/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=auth(srv, "admin")
    )
    assert response.status_code not in (401, 403), response.text
    assert response.status_code < 500, response.text


def test_body_size_and_n_limits(http, keyed_server):
    srv = keyed_server
    big = {"model": srv.base, "prompt": "x" * 8000, "max_tokens": 1}
    error_of(
        http.post("/v1/completions", json=big, headers=auth(srv, "admin")),
        413,
        "request_too_large",
    )
    chunks = [b'{"model": "' + srv.base.encode() + b'", "prompt": "', b"x" * 5000, b'"}']
    chunked = http.post(
        "/v1/completions",
        content=iter(chunks),
        headers={**auth(srv, "admin"), "Content-Type": "application/json"},
    )
    error_of(chunked, 413, "request_too_large")
    many = {"model": srv.base, "prompt": "x", "max_tokens": 1, "n": 3}
    error = error_of(
        http.post("/v1/completions", json=many, headers=auth(srv, "admin")), 400, "invalid_value"
    )
    assert error["param"] == "n"
    two = http.post("/v1/completions", json={**many, "n": 2}, headers=auth(srv, "admin"))
    assert two.status_code == 200, two.text
    assert len(two.json()["choices"]) == 2


def test_keys_never_reach_the_log(http, keyed_server):
    srv = keyed_server
    for role in srv.keys:  # make sure every key has been presented at least once
        http.get("/v1/models", headers=auth(srv, role))
    http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-000"})
    log = srv.log.read_text(errors="replace")
    assert "ready:" in log
    for key in [*srv.keys.values(), "sk-wrong-000"]:
        assert key not in log


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


def test_key_scope_keeps_tenants_cached_prefixes_apart(http, keyed_server):
    # keyed_server runs with --prefix-cache-scope key
    rules = " ".join(f"Policy {i}: be brief about harbours." for i in range(10))
    body = {
        "model": keyed_server.base,
        "messages": [{"role": "system", "content": rules}, {"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "temperature": 0,
    }

    def cached(role: str) -> int:
        response = http.post("/v1/chat/completions", json=body, headers=auth(keyed_server, role))
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("admin") == 0
    assert cached("user") == 0  # the same prompt under another key: nothing shared
    assert cached("user") > 0 and cached("admin") > 0  # each key reuses its own

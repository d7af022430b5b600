"""Locust users for loraplex: chat and completions (streamed and not) on Zipf-popular adapters, a
base-only user, a cold-burst user and an admin adapter-churn user (which, if the server cannot load
adapters from LOADTEST_CHURN_DIR, says why once and stops instead of failing every request).

Streaming users report time to first token ("TTFT") and inter-token latency ("ITL") as their own
request types. Environment: LOADTEST_ADAPTERS (comma names; default: every adapter /v1/models lists),
LOADTEST_ZIPF_S (1.1), LOADTEST_MAX_TOKENS (16), LOADTEST_API_KEY, LOADTEST_ADMIN_KEY,
LOADTEST_CHURN_DIR (folders load_lora_adapter may read), LOADTEST_TOKENS_FILE (token counts, JSON).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import gevent
from locust import HttpUser, between, events, task
from locust.exception import StopUser

ZIPF_S = float(os.environ.get("LOADTEST_ZIPF_S", "1.1"))
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "16"))
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
ADMIN_KEY = os.environ.get("LOADTEST_ADMIN_KEY", API_KEY)
COLD_BURST = 4
PROMPTS = ["Count to ten:", "Name three colours.", "Reverse the word 'lantern'.", "Say hello."]
STATE: dict[str, Any] = {"base": None, "adapters": [], "weights": [], "tokens": 0, "streams": 0}
CHURN: dict[str, Any] = {"skip": None, "said": False}  # why the churn user cannot run, if it cannot


def headers(key: str) -> dict[str, str]:
    """Authorization header for key (none when empty)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


@events.test_start.add_listener
def discover(environment: Any, **_: Any) -> None:
    """Find the base id and the adapters; weight adapter i by 1 / (i + 1) ** s (Zipf)."""
    import httpx

    models = httpx.get(environment.host + "/v1/models", headers=headers(API_KEY), timeout=60)
    data = models.json()["data"]
    STATE["base"] = next(m["id"] for m in data if m.get("parent") is None)
    listed = [m["id"] for m in data if m.get("parent") is not None]
    chosen = os.environ.get("LOADTEST_ADAPTERS")
    names = [n for n in chosen.split(",") if n] if chosen else listed
    STATE["adapters"] = names
    STATE["weights"] = [1 / (i + 1) ** ZIPF_S for i in range(len(names))]
    if any(user.__name__ == "ChurnUser" for user in environment.user_classes):
        CHURN["skip"] = churn_unavailable(environment.host)


def churn_folders() -> list[Path]:
    """The adapter folders in LOADTEST_CHURN_DIR."""
    root = Path(os.environ.get("LOADTEST_CHURN_DIR", ""))
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def churn_unavailable(host: str) -> str | None:
    """Why the churn user cannot run against host (None if it can): no folders to load, or the
    server refuses to load one (no adapter roots holding them, not an admin key). Probes with one
    load and unload outside locust's statistics."""
    import httpx

    folders = churn_folders()
    if not folders:
        return "LOADTEST_CHURN_DIR names no folder of adapters"
    name = f"churn-probe-{uuid.uuid4().hex[:12]}"
    admin = headers(ADMIN_KEY)
    load = {"lora_name": name, "lora_path": str(folders[0])}
    response = httpx.post(host + "/v1/load_lora_adapter", json=load, headers=admin, timeout=60)
    if response.status_code != 200:
        return f"the server refused to load {folders[0]} ({response.status_code}: {response.text})"
    httpx.post(
        host + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin, timeout=60
    )
    return None


@events.test_stop.add_listener
def save_tokens(**_: Any) -> None:
    """Write the generated-token count for the report."""
    path = os.environ.get("LOADTEST_TOKENS_FILE")
    if path:
        Path(path).write_text(json.dumps({"tokens": STATE["tokens"], "streams": STATE["streams"]}))


def pick_adapter() -> str:
    """An adapter drawn by Zipf popularity (the base if there are none)."""
    if not STATE["adapters"]:
        return STATE["base"]
    return random.choices(STATE["adapters"], STATE["weights"])[0]


def fire(user: HttpUser, kind: str, name: str, seconds: float) -> None:
    """Report a custom latency metric to locust."""
    user.environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=seconds * 1000,
        response_length=0,
        exception=None,
        context={},
    )


class LoraplexUser(HttpUser):
    """Shared request helpers; not run by itself."""

    abstract = True
    wait_time = between(0.05, 0.3)

    def body(self, chat: bool, model: str, stream: bool) -> dict[str, Any]:
        """A small request for model."""
        prompt = random.choice(PROMPTS)
        payload: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "stream": stream}
        if chat:
            payload["messages"] = [{"role": "user", "content": prompt}]
        else:
            payload["prompt"] = prompt
        return payload

    def call(self, chat: bool, model: str, stream: bool, label: str) -> None:
        """One request; streamed ones also report TTFT and ITL."""
        path = "/v1/chat/completions" if chat else "/v1/completions"
        payload = self.body(chat, model, stream)
        sent = time.perf_counter()
        with self.client.post(
            path,
            json=payload,
            headers=headers(API_KEY),
            name=label,
            stream=stream,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            if not stream:
                STATE["tokens"] += response.json()["usage"]["completion_tokens"]
                response.success()
                return
            self.read_stream(response, chat, label, sent)

    def read_stream(self, response: Any, chat: bool, label: str, sent: float) -> None:
        """Consume an SSE stream, timing tokens from `sent` (the request's start); fail on an
        error event or a missing finish."""
        last, finish, done = None, None, False
        for line in response.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                response.failure(f"stream error: {chunk['error']}")
                return
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                if text:
                    now = time.perf_counter()
                    if last is None:
                        fire(self, "TTFT", label, now - sent)
                    else:
                        fire(self, "ITL", label, now - last)
                    last = now
                    STATE["tokens"] += 1
                finish = choice.get("finish_reason") or finish
        STATE["streams"] += 1
        if not done or finish is None:
            response.failure(f"stream ended without finish_reason/[DONE] ({finish}, {done})")
        else:
            response.success()


class ChatUser(LoraplexUser):
    """Chat completions on Zipf-popular adapters, streamed and not."""

    @task(3)
    def chat_stream(self) -> None:
        self.call(True, pick_adapter(), True, "chat stream")

    @task(1)
    def chat(self) -> None:
        self.call(True, pick_adapter(), False, "chat")


class CompletionUser(LoraplexUser):
    """Text completions on Zipf-popular adapters, streamed and not."""

    @task(1)
    def completion_stream(self) -> None:
        self.call(False, pick_adapter(), True, "completion stream")

    @task(1)
    def completion(self) -> None:
        self.call(False, pick_adapter(), False, "completion")


class BaseOnlyUser(LoraplexUser):
    """The bare base model only."""

    @task
    def base_stream(self) -> None:
        self.call(True, STATE["base"], True, "base stream")


class ColdBurstUser(LoraplexUser):
    """Bursts of concurrent requests on one unpopular (likely cold) adapter."""

    wait_time = between(1, 2)

    @task
    def burst(self) -> None:
        tail = STATE["adapters"][len(STATE["adapters"]) // 2 :] or [STATE["base"]]
        model = random.choice(tail)
        jobs = [gevent.spawn(self.call, True, model, True, "cold burst") for _ in range(COLD_BURST)]
        gevent.joinall(jobs)


class ChurnUser(LoraplexUser):
    """Admin: load an adapter from LOADTEST_CHURN_DIR, use it, unload it, during traffic."""

    wait_time = between(0.5, 1)

    def stop_if_unable(self) -> None:
        """Stop this user (saying why, once for all churn users) when the server cannot churn
        adapters. Raised from a task, StopUser ends the user quietly (from on_start, locust logs
        a traceback per user)."""
        if CHURN["skip"] is None:
            return
        if not CHURN["said"]:
            CHURN["said"] = True
            print(f"ChurnUser skipped: {CHURN['skip']}; give the server --adapter-roots holding it")
        raise StopUser()

    @task
    def churn(self) -> None:
        self.stop_if_unable()
        folder = random.choice(churn_folders())
        name = f"churn-{folder.name}-{uuid.uuid4().hex[:12]}"  # never another user's
        admin = headers(ADMIN_KEY)
        load = {"lora_name": name, "lora_path": str(folder)}
        response = self.client.post(
            "/v1/load_lora_adapter", json=load, headers=admin, name="load_lora_adapter"
        )
        if response.status_code == 200:
            self.call(True, name, True, "churn stream")
            self.client.post(
                "/v1/unload_lora_adapter",
                json={"lora_name": name},
                headers=admin,
                name="unload_lora_adapter",
            )

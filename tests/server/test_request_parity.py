"""Requests written for OpenAI and vLLM work unchanged on the real server (demo model, test
adapters): the official client's penalties, logit_bias and extra_body sampling fields, echo with
prompt logprobs, models.retrieve, and vLLM's /tokenize and /detokenize. The numerics of each
parameter are tested against transformers in tests/server/engine/test_sampling_params.py."""

from __future__ import annotations

import httpx
import openai
import pytest

BASE = "SmolLM2-135M-Instruct"
PROMPT = "The three primary colors are"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def tokens_of(http, text: str) -> list[int]:
    reply = http.post("/tokenize", json={"prompt": text})
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def test_openai_and_vllm_sampling_fields_through_the_official_client(client, http):
    forced = tokens_of(http, " blue")[0]
    out = client.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={str(forced): 100},
        extra_body={"repetition_penalty": 1.0, "top_k": 5, "min_p": 0.1, "seed": 1},
    )
    # a +100 bias on one token makes it every greedy token
    assert out.choices[0].text == " blue" * 5
    long = client.completions.create(
        model=BASE,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={"min_tokens": 6, "ignore_eos": True, "repetition_penalty": 1.2},
    )
    assert long.usage.completion_tokens == 6 and long.choices[0].finish_reason == "length"


def test_stop_token_ids_and_include_stop_str_in_output(http):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0}
    free = http.post("/v1/completions", json=body).json()["choices"][0]
    tokens = free["logprobs"]["tokens"]
    stop_text = tokens[2]
    stop_id = tokens_of(http, PROMPT + "".join(tokens[:3]))[-1]
    assert http.post("/detokenize", json={"tokens": [stop_id]}).json()["prompt"] == stop_text
    cut = http.post("/v1/completions", json={**body, "stop_token_ids": [stop_id]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == "".join(tokens[:2])
    kept = {**body, "stop_token_ids": [stop_id], "include_stop_str_in_output": True}
    assert http.post("/v1/completions", json=kept).json()["choices"][0]["text"] == "".join(
        tokens[:3]
    )
    stop = {**body, "stop": [stop_text.strip()], "include_stop_str_in_output": True}
    text = http.post("/v1/completions", json=stop).json()["choices"][0]["text"]
    assert text.endswith(stop_text.strip()) and text.startswith(tokens[0])
    # stop strings only count from min_tokens on (vLLM): the first token's text is no stop yet
    early = {**body, "stop": [tokens[0]]}
    assert http.post("/v1/completions", json=early).json()["choices"][0]["text"] == ""
    late = http.post("/v1/completions", json={**early, "min_tokens": 2}).json()["choices"][0]
    assert late["text"].startswith(tokens[0] + tokens[1])


def test_skip_special_tokens(http):
    eos = tokens_of(http, "<|im_end|>")
    assert len(eos) == 1
    body = {
        "model": BASE,
        "prompt": PROMPT,
        "max_tokens": 2,
        "temperature": 0,
        "logit_bias": {str(eos[0]): 100},
        "ignore_eos": True,
    }
    hidden = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    shown = http.post("/v1/completions", json={**body, "skip_special_tokens": False}).json()
    assert hidden == "" and shown["choices"][0]["text"] == "<|im_end|>" * 2


def test_echo_logprobs_and_prompt_scoring(client, http):
    prompt_ids = tokens_of(http, PROMPT)
    out = client.completions.create(
        model="beta", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[1]) == 2
    assert lp.text_offset[len(prompt_ids)] == len(PROMPT)
    # max_tokens 0 scores the prompt alone (lm-evaluation-harness' loglikelihood request)
    scored = client.completions.create(
        model="beta", prompt=[prompt_ids], max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    only = scored.choices[0]
    assert only.text == PROMPT and scored.usage.completion_tokens == 0
    assert only.logprobs.token_logprobs == lp.token_logprobs[: len(prompt_ids)]
    # vLLM's prompt_logprobs: per prompt token its own entry (with rank) and the top ones
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1}
    vllm = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    assert vllm[0] is None and len(vllm) == len(prompt_ids)
    for position, entry in enumerate(vllm[1:], 1):
        own = entry[str(prompt_ids[position])]
        assert own["logprob"] == pytest.approx(lp.token_logprobs[position], abs=1e-5)
        assert own["rank"] >= 1 and 1 <= len(entry) <= 2
    stream = http.post("/v1/completions", json={**body, "stream": True, "echo": True})
    assert stream.status_code == 200 and PROMPT in stream.text and "prompt_logprobs" in stream.text


def test_models_retrieve(client, peft_adapters):
    card = client.models.retrieve("alpha")
    assert card.id == "alpha" and card.model_extra["parent"] == BASE
    assert client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


def test_tokenize_and_detokenize(http):
    prompt = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    body = prompt.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {
        "prompt": "Hello world"
    }
    messages = [{"role": "user", "content": "Name a color."}]
    chat = http.post(
        "/v1/chat/completions", json={"model": BASE, "messages": messages, "max_tokens": 1}
    ).json()
    rendered = http.post("/tokenize", json={"messages": messages, "model": "alpha"}).json()
    assert rendered["count"] == chat["usage"]["prompt_tokens"]
    for bad, param in [
        ({"prompt": "x", "messages": messages}, None),
        ({"prompt": "x", "model": "nope"}, "model"),
    ]:
        reply = http.post("/tokenize", json=bad)
        assert reply.status_code in (400, 404) and reply.json()["error"]
        assert param is None or reply.json()["error"]["param"] == param
    assert http.post("/detokenize", json={"tokens": [10**8]}).status_code == 400

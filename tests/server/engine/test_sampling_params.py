"""Sampling parameters (penalties, logit bias, min tokens, min-p / top-k / top-p) and prompt logprobs
against independent references on the real demo model in float32 (exact to ~1e-5): transformers'
logits processors, the formulas written out, and a plain transformers + PEFT forward."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.penalties import process
from server.engine.sampler import draw, ranked
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams

PROMPT = "Write a short story about a robot who learns to paint the sea, the sky and the sun."


@pytest.fixture(scope="module")
def engine(fp32_engine, demo_path, peft_adapters):
    # 16-token chunks: every prompt here is prefilled in several steps
    return fp32_engine(
        demo_path, {"alpha": peft_adapters["alpha"]}, max_batch_tokens=16, kv_capacity_tokens=4096
    )


@pytest.fixture(scope="module")
def reference(demo_path, peft_adapters):
    """Plain transformers + PEFT in float32 with adapter alpha."""
    model = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    return PeftModel.from_pretrained(model, peft_adapters["alpha"], adapter_name="alpha").eval()


def chat(engine, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return engine.base.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]


def ref_logits(reference, ids: list[int], adapter: str | None) -> torch.Tensor:
    """The reference's logits [T, V] over ids."""
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                return reference(torch.tensor([ids])).logits[0]
        reference.set_adapter(adapter)
        return reference(torch.tensor([ids])).logits[0]


def filtered_probs(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The sampler's filtered distribution [M, V] in vocabulary order."""
    probs, ids = ranked(scaled, params)
    return probs if ids is None else torch.zeros_like(scaled).scatter_(1, ids, probs)


def seq(prompt: list[int], output: list[int], **params) -> Sequence:
    s = Sequence("r", list(prompt), None, SamplingParams(max_tokens=64, **params))
    s.output_ids = list(output)
    return s


# processors on real logits -------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(engine, reference):
    """A prompt, a generated continuation and the reference's logits [V] after them."""
    ids = engine.base.tokenizer(PROMPT).input_ids
    prompt, output = ids[:12], ids[12:]
    return prompt, output, ref_logits(reference, ids, "alpha")[-1]


def test_repetition_penalty_equals_transformers(real):
    prompt, output, logits = real
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[None])
    got = process(logits[None], [seq(prompt, output, repetition_penalty=1.3)], ())
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, logits[None])


def test_frequency_and_presence_penalties_follow_openai_formula(real):
    prompt, output, logits = real
    output = output + output[:3]  # some tokens twice
    got = process(
        logits[None], [seq(prompt, output, frequency_penalty=0.7, presence_penalty=1.1)], ()
    )
    expected = logits.clone()
    for token in set(output):  # OpenAI: mu - c * alpha_frequency - (c > 0) * alpha_presence
        expected[token] -= output.count(token) * 0.7 + 1.1
    torch.testing.assert_close(got[0], expected)


def test_logit_bias_equals_transformers_sequence_bias(real):
    prompt, output, logits = real
    bias = [[[17], 5.0], [[output[0]], -100.0]]
    expected = SequenceBiasLogitsProcessor(bias)(torch.tensor([prompt + output]), logits[None])
    got = process(
        logits[None], [seq(prompt, output, logit_bias=((17, 5.0), (output[0], -100.0)))], ()
    )
    torch.testing.assert_close(got, expected)


def test_min_tokens_equals_transformers(engine, real):
    prompt, output, logits = real
    eos = sorted(engine.eos_ids)
    reference = MinNewTokensLengthLogitsProcessor(len(prompt), len(output) + 1, eos)
    expected = reference(torch.tensor([prompt + output]), logits[None])
    got = process(logits[None], [seq(prompt, output, min_tokens=len(output) + 1)], eos)
    torch.testing.assert_close(got, expected)
    # a stop token id is held back too, and nothing once min_tokens is reached or EOS is ignored
    held = process(logits[None], [seq(prompt, output, min_tokens=60, stop_token_ids=(5,))], eos)
    assert held[0, 5] == float("-inf") and held[0, eos[0]] == float("-inf")
    for params in ({"min_tokens": len(output)}, {"min_tokens": 60, "ignore_eos": True}):
        assert torch.equal(
            process(logits[None], [seq(prompt, output, **params)], eos), logits[None]
        )


@pytest.mark.parametrize(
    ("params", "warper"),
    [
        ({"min_p": 0.05}, MinPLogitsWarper(0.05)),
        ({"top_k": 20}, TopKLogitsWarper(20)),
        ({"top_p": 0.8}, TopPLogitsWarper(0.8)),
    ],
)
def test_filters_keep_what_transformers_keeps(real, params, warper):
    prompt, output, logits = real
    scaled = logits[None] / 0.7
    kept = torch.isfinite(warper(torch.tensor([prompt]), scaled.clone()))
    probs = filtered_probs(scaled, [SamplingParams(temperature=0.7, **params)])
    assert torch.equal(probs > 0, kept)
    assert 1 < int(kept.sum()) < logits.numel()
    torch.testing.assert_close(probs, torch.softmax(scaled.masked_fill(~kept, float("-inf")), -1))


def test_nucleus_among_candidates_equals_the_full_sort(real):
    """top_p without top_k filters the most likely tokens only when every row's nucleus lies among
    them (real logits: it does), else falls back to the full sort (flat logits: it does not);
    either way the distribution is the full sort's."""
    _, _, logits = real
    flat = torch.randn(logits.numel(), generator=torch.Generator().manual_seed(0)) * 0.01
    for row, params in [
        (logits, [SamplingParams(top_p=0.9)]),
        (logits, [SamplingParams(top_p=0.95, min_p=0.01)]),
        (flat, [SamplingParams(top_p=0.5)]),  # ~24,000 tokens in its nucleus
    ]:
        scaled = row[None] / 0.8
        probs, ids = ranked(scaled, params)
        assert ids.shape[1] == (1024 if row is logits else logits.numel())
        vocab = torch.zeros_like(scaled).scatter_(1, ids, probs)
        full, full_ids = ranked(scaled, params, candidates=logits.numel())
        expected = torch.zeros_like(scaled).scatter_(1, full_ids, full)
        assert torch.equal(vocab > 0, expected > 0)
        torch.testing.assert_close(vocab, expected)
    # a batch mixing a top-k row and a top-p row takes the candidates too
    both = [SamplingParams(top_k=20), SamplingParams(top_p=0.9)]
    probs, ids = ranked(logits[None].repeat(2, 1), both)
    assert ids.shape[1] == 1024
    for i, p in enumerate(both):
        alone = filtered_probs(logits[None], [p])[0]
        torch.testing.assert_close(torch.zeros_like(logits).scatter_(0, ids[i], probs[i]), alone)


def test_mixed_rows_equal_rows_alone(real):
    prompt, output, logits = real
    rows = [
        {},
        {"repetition_penalty": 1.2, "logit_bias": ((3, 2.0),)},
        {"frequency_penalty": -0.5, "presence_penalty": 0.5, "min_tokens": 40},
        {"temperature": 0.7, "top_k": 30, "top_p": 0.9, "min_p": 0.02},
    ]
    seqs = [seq(prompt, output, **p) for p in rows]
    batch = process(logits[None].repeat(len(rows), 1), seqs, [2])
    for i, s in enumerate(seqs):
        assert torch.equal(batch[i], process(logits[None], [s], [2])[0])
    assert torch.equal(batch[0], logits)  # a row without parameters is left as it is
    params = [s.params for s in seqs]
    probs = filtered_probs(batch / 0.7, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(probs[i], filtered_probs(batch[i : i + 1] / 0.7, [p])[0])


def test_draw_samples_the_filtered_distribution(real):
    """The exponential race draws each token with its filtered probability (4,000 draws over the
    real row's 512 most likely tokens; every count within 5 sigma of its expectation)."""
    prompt, _, logits = real
    logits = logits.topk(512).values  # [512]
    params = {"temperature": 1.5, "top_k": 8}
    draws = 4000
    torch.manual_seed(0)
    tokens = draw(logits[None].repeat(draws, 1), [seq(prompt, [], **params)] * draws)
    probs = filtered_probs(logits[None] / 1.5, [SamplingParams(**params)])[0]
    counts = torch.bincount(tokens, minlength=probs.numel()).float()
    assert set(tokens.tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert bool(((counts - draws * probs).abs() <= 5 * sigma + 1).all())


# through the engine ----------------------------------------------------------------------------
def run(engine, requests: dict[str, tuple[list[int], str | None, SamplingParams]]) -> dict:
    """Run requests together; each one's (tokens, outputs)."""
    for rid, (ids, adapter, params) in requests.items():
        engine.add_request(rid, ids, adapter, params)
    outs: dict[str, list] = {rid: [] for rid in requests}
    for _ in range(2000):
        if not engine.has_work():
            break
        for out in engine.step():
            outs[out.request_id].append(out)
    assert not engine.has_work()
    return {
        rid: ([o.token_id for o in o_ if o.token_id is not None], o_) for rid, o_ in outs.items()
    }


class FrequencyPresence(LogitsProcessor):
    """OpenAI's penalties written out, over the tokens generated after the prompt."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for token, count in zip(
            *input_ids[0, self.prompt_len :].unique(return_counts=True), strict=True
        ):
            scores[0, token] -= count * self.frequency + self.presence
        return scores


NEW = 16
CASES = {  # engine parameters -> transformers generate() arguments
    "repetition": ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
    "bias": ({"logit_bias": ((30, 8.0), (28, 3.0))}, {"sequence_bias": [[[30], 8.0], [[28], 3.0]]}),
    "min_tokens": ({"min_tokens": NEW, "max_tokens": NEW + 8}, {"min_new_tokens": NEW}),
    "freq_presence": ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, None),
}


def test_greedy_with_parameters_equals_transformers_generate(engine, reference):
    """Each case, run in one mixed batch with the others (base and adapter rows), gives the tokens
    transformers' generate gives with the same processors for that request alone."""
    prompts = {name: chat(engine, f"Say one short sentence about {name}.") for name in CASES}
    requests = {}
    for i, (name, (params, _)) in enumerate(CASES.items()):
        adapter = "alpha" if i % 2 else None
        fields = {"max_tokens": NEW, "temperature": 0, **params}
        requests[name] = (prompts[name], adapter, SamplingParams(**fields))
    got = run(engine, requests)
    for i, (name, (params, hf)) in enumerate(CASES.items()):
        ids = prompts[name]
        fields = {"max_tokens": NEW, **params}
        processors = LogitsProcessorList()
        if hf is None:
            processors.append(FrequencyPresence(len(ids), 1.5, 0.5))
        reference.set_adapter("alpha")
        with torch.no_grad(), reference.disable_adapter() if i % 2 == 0 else nullcontext():
            out = reference.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=fields["max_tokens"],
                logits_processor=processors,
                **(hf or {}),
            )
        expected = out[0, len(ids) :].tolist()
        assert got[name][0] == expected, name
    assert len(got["min_tokens"][0]) >= NEW


def test_mixed_batch_rows_equal_rows_alone(engine):
    """Rows with different parameters (seeded sampling with filters, penalties, plain greedy) give
    in one batch what each gives alone; plain rows are untouched by penalized neighbours."""
    prompt = chat(engine, "Tell me about the sea.")
    rows = {
        "plain": (None, {"temperature": 0}),
        "plain_adapter": ("alpha", {"temperature": 0}),
        "penalized": (
            "alpha",
            {"temperature": 0, "repetition_penalty": 1.3, "presence_penalty": 1},
        ),
        "seeded": (None, {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.02, "seed": 7}),
        "seeded_pen": ("alpha", {"temperature": 1.1, "frequency_penalty": 0.8, "seed": 3}),
        "bias": (None, {"temperature": 0, "logit_bias": ((13, 4.0),), "min_tokens": 12}),
    }
    requests = {
        rid: (prompt, adapter, SamplingParams(max_tokens=16, **p))
        for rid, (adapter, p) in rows.items()
    }
    together = run(engine, requests)
    for rid, request in requests.items():
        alone = run(engine, {rid: request})
        assert together[rid][0] == alone[rid][0], rid
    assert together["plain_adapter"][0] != together["penalized"][0]  # the penalties act


def test_echo_prompt_logprobs_equal_a_plain_forward(engine, reference):
    """Prompt logprobs through chunked prefill (16-token chunks) and past a cached prefix equal
    log_softmax of one forward over the prompt; max_tokens 0 scores the prompt alone."""
    ids = engine.base.tokenizer(PROMPT * 2).input_ids  # 40+ tokens: three chunks
    run(engine, {"warm": (ids, "alpha", SamplingParams(max_tokens=1, temperature=0))})
    scored = SamplingParams(max_tokens=0, prompt_logprobs=3)
    outs = run(engine, {"score": (ids, "alpha", scored)})["score"][1]
    assert len(outs) == 1 and outs[0].token_id is None and outs[0].finish_reason == "length"
    entries = outs[0].prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    expected = torch.log_softmax(ref_logits(reference, ids, "alpha"), -1)  # [T, V]
    for pos, entry in enumerate(entries[1:], 1):
        row = expected[pos - 1]
        assert entry.logprob == pytest.approx(float(row[ids[pos]]), abs=1e-4)
        assert entry.rank == int((row >= row[ids[pos]]).sum())
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    # with a completion: the same prompt scores arrive with the first token
    both = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0, logprobs=0)
    first = run(engine, {"both": (ids, "alpha", both)})["both"][1][0]
    assert first.token_id is not None
    got = [e.logprob for e in first.prompt_logprobs[1:]]
    assert got == pytest.approx([e.logprob for e in entries[1:]], abs=1e-4)

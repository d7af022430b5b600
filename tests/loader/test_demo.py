"""The demo model's one-time GGUF -> safetensors conversion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loader.demo import COMPLETE_MARKER, DEMO_NAME, demo_gguf_path, prepare_demo

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


def greedy(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_converted_matches_gguf(demo_path: Path):
    gguf = demo_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    conv = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(demo_path)
    assert conv.config.tie_word_embeddings
    assert conv.lm_head.weight.data_ptr() == conv.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    for prompt in PROMPTS:
        assert tok(prompt).input_ids == ref_tok(prompt).input_ids
        assert greedy(conv, tok, prompt) == greedy(ref, ref_tok, prompt)


def test_reuse_does_not_convert_again(demo_path: Path):
    marker = demo_path / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    assert prepare_demo() == demo_path
    assert marker.stat().st_mtime_ns == before


def test_interrupted_conversion_leaves_no_trusted_folder(tmp_path: Path):
    env = {**os.environ, "LORAPLEX_CACHE": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "prepare"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    time.sleep(4)  # well inside the ~25 s conversion
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    models = tmp_path / "models"
    assert not (models / DEMO_NAME).exists()
    leftovers = list(models.iterdir()) if models.exists() else []
    assert all(p.name.startswith(".") for p in leftovers)  # temp folders only, never the target
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "prepare"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    target = Path(done.stdout.strip().splitlines()[-1])
    assert target == models / DEMO_NAME
    assert (target / COMPLETE_MARKER).exists() and (target / "model.safetensors").exists()

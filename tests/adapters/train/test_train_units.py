"""Trainer pieces that need no training run: the bnb kernel guard, schedule, errors, registration."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from adapters.train.config import TrainConfig, TrainError
from adapters.train.loop import lr_factor
from adapters.train.manifest import base_fingerprint, fingerprint_mismatches
from adapters.train.register import register_adapter
from adapters.train.trainer import set_training_kernels, train
from loader.config import Config
from loader.model import BaseModel
from server.cli import main


def nf4_layer() -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def test_training_kernels_keep_input_gradients_after_a_no_grad_forward():
    # DESIGN.md trap: on AVX512-BF16 CPUs a no-grad eval forward repacks the weight in place and
    # backward then silently yields no input gradient. The trainer turns the repack off.
    layer = nf4_layer()
    set_training_kernels(layer, training=True)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    layer.train()
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # [out, in]
    assert x.grad is not None
    torch.testing.assert_close(
        x.grad.float(), dense.float().sum(0).expand(2, -1), rtol=0.02, atol=0.05
    )


def test_lr_schedule_warms_up_then_holds_or_decays():
    constant = lr_factor(TrainConfig(warmup_steps=4), 100)
    assert [constant(s) for s in (0, 3, 4, 99)] == [0.2, 0.8, 1.0, 1.0]
    cosine = lr_factor(TrainConfig(warmup_steps=0, schedule="cosine"), 100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5, abs=0.02) and cosine(99) < 0.01
    assert TrainConfig().warmup(200) == 6 and TrainConfig().total_steps(401) == 51


def test_bad_hyperparameters_are_refused_together():
    with pytest.raises(TrainError, match="rank must be positive.*dropout"):
        TrainConfig(rank=0, dropout=1.5)


def test_cli_reports_bad_data_with_line_numbers(tmp_path: Path, demo_path: Path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": \n[1]\n{"prompt": 3, "completion": "x"}\n')
    argv = ["train", "--model", str(demo_path), "--data", str(data), "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no usable example: 3 invalid lines" in err and "line 1: invalid JSON" in err
    assert not (tmp_path / "a").exists()


def test_existing_output_and_missing_checkpoint_are_refused(tmp_path: Path, demo_path: Path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    (tmp_path / "taken").mkdir()
    with pytest.raises(TrainError, match="already exists; pass --overwrite"):
        train(Config(model=str(demo_path)), TrainConfig(), data, tmp_path / "taken")
    with pytest.raises(TrainError, match="no checkpoint"):
        train(Config(model=str(demo_path)), TrainConfig(), data, tmp_path / "new", resume=True)


def test_fingerprint_identifies_config_and_quantization(nf4_base: BaseModel):
    fp = base_fingerprint(nf4_base)
    assert fp["quant"] == "nf4" and fp["double_quant"] is True and len(fp["config_sha256"]) == 64
    assert fingerprint_mismatches(fp, dict(fp)) == []
    other = fp | {"quant": "fp4", "config_sha256": "0" * 64}
    assert len(fingerprint_mismatches(fp, other)) == 2


class Recorder(BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.calls.append((self.path, body, self.headers.get("Authorization")))
        ok = body["lora_name"] != "refused"
        payload = b'"ok"' if ok else b'{"error": {"message": "rank too large"}}'
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_register_posts_vllm_shaped_load_request(tmp_path: Path):
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        assert register_adapter(url, "digits", tmp_path / "digits", api_key="k") == "ok"
        with pytest.raises(RuntimeError, match="HTTP 400.*rank too large"):
            register_adapter(url, "refused", tmp_path)
    finally:
        server.shutdown()
    path, body, auth = Recorder.calls[0]
    assert path == "/v1/load_lora_adapter" and auth == "Bearer k"
    assert body == {"lora_name": "digits", "lora_path": str((tmp_path / "digits").absolute())}
    with pytest.raises(RuntimeError, match="cannot reach"):
        register_adapter("http://127.0.0.1:9", "x", tmp_path, timeout=2)

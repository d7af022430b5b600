"""NF4 loading of the demo model, its memory report and the loader's error paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from loader.config import Config, ConfigError
from loader.errors import ModelSourceError
from loader.memory import memory_report
from loader.model import BaseModel, load_base
from loader.source import resolve_source


def test_nf4_answers_paris(nf4_base: BaseModel):
    tok = nf4_base.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    input_ids = torch.tensor([ids["input_ids"]])
    with torch.no_grad():
        out = nf4_base.model.generate(input_ids, max_new_tokens=24, do_sample=False)
    assert "Paris" in tok.decode(out[0, input_ids.shape[1] :])


def test_decoder_linears_are_nf4_and_head_is_16bit(nf4_base: BaseModel):
    model = nf4_base.model
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(proj, bnb.nn.Linear4bit)
        assert proj.weight.quant_state.quant_type == "nf4"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_memory_report_ratio(nf4_base: BaseModel):
    report = memory_report(nf4_base.model)
    assert report.quantized_layers == 30 * 7
    # NF4 (4 bits) + double-quantized absmax (8 bits / 64) + fp32 second-level scales: 4.127/16
    assert 0.258 <= report.ratio <= 0.27
    assert report.total_resident_bytes > report.quantized_linear_bytes
    assert "ratio" in report.format()


def test_missing_folder():
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_source("/does/not/exist")


def test_folder_without_config(tmp_path: Path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelSourceError, match="unsupported architecture 'vit'"):
        load_base(Config(model=str(tmp_path), device="cpu"))


def test_unquantizable_dimension_names_layer(tmp_path: Path, demo_path: Path):
    config = json.loads((demo_path / "config.json").read_text())
    config.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    config.update(intermediate_size=200, num_hidden_layers=1)  # 200 % 32 != 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelSourceError, match=r"mlp\.gate_proj has out_features=200.*multiple of 32"
    ):
        load_base(Config(model=str(tmp_path), device="cpu"))
    config.update(
        intermediate_size=224
    )  # a multiple of 32, not of the 64-wide blocks down_proj reads
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelSourceError, match=r"mlp\.down_proj has in_features=224.*multiple of 64"
    ):
        load_base(Config(model=str(tmp_path), device="cpu"))


def test_hub_id_without_network_says_so():
    with pytest.raises(ModelSourceError, match="no network.*--model /path"):
        resolve_source("loraplex-test/definitely-not-cached")


def test_bad_config_values():
    with pytest.raises(ConfigError, match="quant"):
        Config(quant="int3")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        Config(max_num_seqs=0)


def test_unquantized_mode_loads_plain_linear(demo_path: Path):
    base = load_base(Config(model=str(demo_path), quant="none"))
    assert type(base.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert memory_report(base.model).quantized_layers == 0


def test_prepare_prints_folder_last(demo_path: Path, tmp_path: Path):
    local = tmp_path / "copy"
    shutil.copytree(demo_path, local)
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "prepare", "--model", str(local)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == str(local)

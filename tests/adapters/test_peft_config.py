"""Refusals decided by adapter_config.json and by our trainer's manifest, on real adapter copies."""

from __future__ import annotations

import json

import pytest

FINGERPRINT = {
    "source": "demo",
    "architecture": "LlamaForCausalLM",
    "config_sha256": "abc",
    "quant": "nf4",
}


def test_missing_config(spoilt, refused):
    (spoilt / "adapter_config.json").unlink()
    refused(spoilt, "missing_adapter_config", "adapter_config.json is missing")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('"LORA"', "expected a JSON object, got str"),
    ],
)
def test_invalid_config_json(spoilt, refused, text: str, fragment: str):
    (spoilt / "adapter_config.json").write_text(text)
    refused(spoilt, "invalid_adapter_config", fragment)


@pytest.mark.parametrize("key", ["r", "lora_alpha", "target_modules", "peft_type"])
def test_config_missing_required_field(spoilt, refused, edit_config, key: str):
    edit_config(spoilt, **{key: None})
    refused(spoilt, "invalid_adapter_config", f"{key} is missing")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"lora_alpha": "16"}, "lora_alpha must be a positive number"),
        ({"target_modules": []}, "target_modules must be"),
        ({"target_modules": "q_proj("}, "not a valid regex"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern must map"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must map"),
        ({"layers_to_transform": "all"}, "layers_to_transform must be"),
    ],
)
def test_config_invalid_field(spoilt, refused, edit_config, changes: dict, fragment: str):
    edit_config(spoilt, **changes)
    refused(spoilt, "invalid_adapter_config", fragment)


def test_other_peft_type(spoilt, refused, edit_config):
    edit_config(spoilt, peft_type="IA3")
    refused(spoilt, "unsupported_peft_type", "'IA3'")


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [
        (["q_proj", "c_attn"], "'c_attn' is not a decoder linear layer"),
        (r".*\.attn\.c_proj", "matches no decoder linear layer"),
    ],
)
def test_config_target_module_absent_from_base(
    spoilt, refused, edit_config, targets, fragment: str
):
    edit_config(spoilt, target_modules=targets)
    refused(spoilt, "unknown_target_module", fragment)


def test_regex_and_all_linear_targets_are_accepted(spoilt, read_lora, edit_config):
    edit_config(spoilt, target_modules=r".*\.(q_proj|v_proj)")
    assert len(read_lora(spoilt).modules) == 60
    edit_config(spoilt, target_modules="all-linear")
    assert len(read_lora(spoilt).modules) == 60


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, "LoRA on 'lm_head'"),
        ({"target_modules": ["embed_tokens"]}, "LoRA on 'embed_tokens'"),
        ({"layer_replication": [[0, 4], [2, 6]]}, "layer_replication"),
        ({"init_lora_weights": "pissa_niter_4"}, "modifies the base weights"),
        ({"init_lora_weights": "loftq"}, "modifies the base weights"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"trainable_token_indices": [5]}, "trainable_token_indices"),
        ({"lora_bias": True}, "lora_bias"),
        ({"use_qalora": True}, "QALoRA"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"kasa_config": {"r": 4}}, "KaSA"),
    ],
)
def test_unsupported_variants(spoilt, refused, edit_config, changes: dict, fragment: str):
    edit_config(spoilt, **changes)
    refused(spoilt, "unsupported_adapter", fragment)


def test_harmless_options_are_accepted(spoilt, read_lora, edit_config):
    edit_config(spoilt, init_lora_weights="gaussian", lora_dropout=0.1, some_future_option="x")
    assert len(read_lora(spoilt).modules) == 60


def write_manifest(folder, manifest: object) -> None:
    (folder / "loraplex_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("field", ["base_fingerprint", "base"])
def test_manifest_fingerprint_must_match_base(spoilt, read_lora, refused, field: str):
    manifest = {field: FINGERPRINT | {"config_sha256": "def"}, "steps": 50}
    write_manifest(spoilt, manifest)
    refused(
        spoilt,
        "base_mismatch",
        "config_sha256: adapter 'def' vs base 'abc'",
        base_fingerprint=FINGERPRINT,
    )
    assert (
        read_lora(spoilt).manifest == manifest
    )  # no fingerprint of the base given: nothing to compare


def test_matching_fingerprint_is_accepted(spoilt, read_lora):
    manifest = {"base_fingerprint": FINGERPRINT | {"source": "/models/smollm"}, "steps": 50}
    write_manifest(spoilt, manifest)
    assert read_lora(spoilt, base_fingerprint=FINGERPRINT).manifest == manifest


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{oops", "not readable JSON"),
        ("[]", "JSON object"),
        ('{"base": 3}', "base must be an object"),
    ],
)
def test_invalid_manifest(spoilt, refused, text: str, fragment: str):
    (spoilt / "loraplex_manifest.json").write_text(text)
    refused(spoilt, "invalid_adapter_manifest", fragment)

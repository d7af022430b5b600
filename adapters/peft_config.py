"""PEFT's adapter_config.json and our trainer's manifest: parsed, refused when not plain LoRA,
and the per-module rank and scaling they imply."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from adapters.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "loraplex_manifest.json"
# Where the manifest keeps the base fingerprint ("base" is what adapters/train writes today).
FINGERPRINT_FIELDS = ("base_fingerprint", "base")
# Fingerprint keys saying where the base came from, not what it is: the same weights may be
# served from a hub id, a local folder or "demo", so these never count as a mismatch.
DESCRIPTIVE_FINGERPRINT_KEYS = ("source", "name")

# Options that change what the adapter computes (LoRA variants, extra trained parts, a modified
# base): any truthy value is refused, since serving applies only base(x) + scaling * B(A(x)).
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "a bias on lora_B (lora_bias) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "layer_replication": "layer_replication (a re-stacked base) is not supported",
    "trainable_token_indices": "trained token rows (trainable_token_indices) are not supported",
    "megatron_config": "Megatron parallel LoRA layers (megatron_config) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
}
# init_lora_weights values that either rewrite the base weights (the adapter is only valid on that
# modified base) or select a LoRA variant.
REFUSED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
EMBEDDING_OR_HEAD = re.compile(
    r"(^|\.)(lm_head|embed_tokens|embed_in|embed_out|wte|wpe|\w*embed\w*)$"
)


def is_embedding_or_head(module: str) -> bool:
    """Whether a module path (or target name) names an embedding table or the LM head."""
    return EMBEDDING_OR_HEAD.search(module) is not None


def _invalid(message: str) -> AdapterError:
    """An invalid-config error."""
    return AdapterError(f"invalid {CONFIG_FILE}: {message}", "invalid_adapter_config")


def _unsupported(message: str) -> AdapterError:
    """An unsupported-variant error."""
    return AdapterError(f"unsupported adapter: {message}", "unsupported_adapter")


def _is_number(value: object) -> bool:
    """Whether value is a finite int or float (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: object) -> bool:
    """Whether value is a positive int (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_adapter_config(folder: Path) -> dict:
    """The adapter's PEFT config, checked to describe plain LoRA with the fields we need."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{CONFIG_FILE} is missing in {folder}", "missing_adapter_config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid(f"not readable JSON ({error})") from error
    if not isinstance(config, dict):
        raise _invalid(f"expected a JSON object, got {type(config).__name__}")
    if "peft_type" not in config:
        raise _invalid("peft_type is missing")
    if config["peft_type"] != "LORA":
        raise AdapterError(
            f"unsupported peft_type {config['peft_type']!r}: only LORA adapters are served",
            "unsupported_peft_type",
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise _invalid(f"{key} is missing")
    if not _is_rank(config["r"]):
        raise _invalid(f"r must be a positive integer, got {config['r']!r}")
    if not _is_number(config["lora_alpha"]) or config["lora_alpha"] <= 0:
        raise _invalid(f"lora_alpha must be a positive number, got {config['lora_alpha']!r}")
    _check_targets_field(config["target_modules"])
    _check_patterns(config)
    _check_supported(config)
    return config


def _check_targets_field(targets: object) -> None:
    """target_modules must be a non-empty list of names, a regex, or "all-linear"."""
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as error:
                raise _invalid(f"target_modules is not a valid regex ({error})") from error
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise _invalid(
            f"target_modules must be a non-empty list of names or a regex, got {targets!r}"
        )


def _check_patterns(config: dict) -> None:
    """rank_pattern/alpha_pattern (normalized to dicts) and use_rslora must be well-typed."""
    for key, valid, what in (
        ("rank_pattern", _is_rank, "positive integers"),
        ("alpha_pattern", lambda v: _is_number(v) and v > 0, "positive numbers"),
    ):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
            raise _invalid(f"{key} must map module patterns to {what}, got {pattern!r}")
        config[key] = pattern
    if not isinstance(config.get("use_rslora", False), bool):
        raise _invalid(f"use_rslora must be true or false, got {config['use_rslora']!r}")


def _check_supported(config: dict) -> None:
    """Refuse biases, modules_to_save, LoRA variants and base-modifying initializations."""
    bias = config.get("bias", "none")
    if bias != "none":
        raise _unsupported(f"bias={bias!r} (trained base biases); only bias='none' is served")
    if config.get("modules_to_save"):
        raise _unsupported(
            f"modules_to_save={config['modules_to_save']!r} (fully trained extra modules); "
            "only LoRA weights are served"
        )
    for key, reason in REFUSED_OPTIONS.items():
        if config.get(key):
            raise _unsupported(reason)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(REFUSED_INITS):
        raise _unsupported(
            f"init_lora_weights={init!r} modifies the base weights or selects a LoRA variant"
        )
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        _is_layer(layers) or (isinstance(layers, list) and all(_is_layer(x) for x in layers))
    ):
        raise _invalid(
            f"layers_to_transform must be a layer index or a list of them, got {layers!r}"
        )


def _is_layer(value: object) -> bool:
    """Whether value is a layer index."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_targets(config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse target_modules that name something the base's decoder linear layers do not have, and
    target_parameters that name no fused expert parameter of the base."""
    experts = sorted(path for path, dims in shapes.items() if len(dims) == 3)
    for target in config.get("target_parameters") or []:
        if not any(path == target or path.endswith(f".{target}") for path in experts):
            have = sorted({p.split(".", 3)[-1] for p in experts}) or ["none"]
            raise _unsupported(
                f"target_parameters entry {target!r} is not a fused MoE expert weight of the base "
                f"(LoRA on raw parameters is served for those only; the base has: {', '.join(have)})"
            )
    targets = config["target_modules"]
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, path) for path in shapes):
            raise AdapterError(
                f"target_modules regex {targets!r} matches no decoder linear layer of the base",
                "unknown_target_module",
            )
        return
    suffixes = sorted({path.rpartition(".")[2] for path in shapes})
    for target in targets:
        if is_embedding_or_head(target):
            raise _unsupported(
                f"LoRA on {target!r}; only decoder linear layers ({', '.join(suffixes)}) are served"
            )
        if not any(path == target or path.endswith(f".{target}") for path in shapes):
            raise AdapterError(
                f"target module {target!r} is not a decoder linear layer of the base "
                f"(it has: {', '.join(suffixes)})",
                "unknown_target_module",
            )


def layer_allowed(config: dict, module: str) -> bool:
    """Whether a module path lies in the config's layers_to_transform (always true when unset)."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return True
    allowed = {layers} if isinstance(layers, int) else set(layers)
    match = re.search(r"\.(\d+)\.", f".{module}.")
    return match is not None and int(match.group(1)) in allowed


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha_pattern lookup: the first key matching the end of the module path."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def module_rank_scaling(config: dict, module: str) -> tuple[int, float]:
    """A module's rank (r or rank_pattern) and PEFT's scaling: alpha/r, or alpha/sqrt(r) if rsLoRA."""
    rank = int(_pattern_value(config["rank_pattern"], module, config["r"]))
    alpha = float(_pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    return rank, scaling


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """The keys both fingerprints hold, apart from where the base was loaded from, that differ."""
    return sorted(
        key
        for key in recorded.keys() & current.keys()
        if key not in DESCRIPTIVE_FINGERPRINT_KEYS and recorded[key] != current[key]
    )


def read_manifest(folder: Path, base_fingerprint: dict | None) -> dict:
    """Our trainer's manifest ({} if absent); refused if its base fingerprint differs from ours."""
    file = folder / MANIFEST_FILE
    if not file.is_file():
        return {}
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(
            f"invalid {MANIFEST_FILE}: not readable JSON ({error})", "invalid_adapter_manifest"
        ) from error
    if not isinstance(manifest, dict):
        raise AdapterError(
            f"invalid {MANIFEST_FILE}: expected a JSON object", "invalid_adapter_manifest"
        )
    key = next((k for k in FINGERPRINT_FIELDS if k in manifest), None)
    recorded = manifest.get(key)
    if key is not None and not isinstance(recorded, dict):
        raise AdapterError(
            f"invalid {MANIFEST_FILE}: {key} must be an object", "invalid_adapter_manifest"
        )
    if recorded is None or base_fingerprint is None:
        return manifest
    differing = fingerprint_differences(recorded, base_fingerprint)
    if differing:
        details = "; ".join(
            f"{k}: adapter {recorded[k]!r} vs base {base_fingerprint[k]!r}" for k in differing
        )
        raise AdapterError(
            f"adapter was trained on a different base (fingerprint differs: {details[:500]})",
            "base_mismatch",
        )
    return manifest

"""The PEFT adapter format: read an adapter folder into plain tensors, validated against the base."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from adapters.bulk_read import read_float32
from adapters.errors import AdapterError
from adapters.peft_config import (
    check_targets,
    is_embedding_or_head,
    layer_allowed,
    module_rank_scaling,
    read_adapter_config,
    read_manifest,
)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
FLOAT32_BYTES = 4
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
UNSUPPORTED_KEYS = (
    (re.compile(r"lora_magnitude_vector"), "DoRA magnitude vectors (lora_magnitude)"),
    (re.compile(r"lora_embedding_[AB]"), "LoRA on an embedding layer"),
    (re.compile(r"\.lora_[AB](\.[A-Za-z0-9_-]+)?\.bias$"), "a LoRA bias (lora_bias)"),
    (re.compile(r"trainable_tokens"), "trainable token embeddings"),
    (re.compile(r"(modules_to_save|\.weight$|\.bias$)"), "fully trained base weights"),
)
Headers = dict[str, dict[str, tuple[str, list[int], str]]]  # module -> side -> (key, shape, dtype)
EXPERT_CHAIN = ".base_layer"  # PEFT nests one ParamWrapper per target parameter of a module


Shapes = dict[str, tuple[int, ...]]  # module path -> (in, out), or (in, out, experts) for experts


@dataclass
class LoraModule:
    """One adapted linear layer: A [r, in], B [out, r] and the PEFT scaling (alpha / r); for a fused
    expert parameter, per expert: A [E, r, in], B [E, out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """The LoRA rank of this layer."""
        return self.A.shape[-2]


def expert_lora(A: torch.Tensor, B: torch.Tensor, experts: int, scaling: float) -> LoraModule:
    """PEFT's target_parameters layout, A [r * E, in] (expert-major rows) and B [out, r * E]
    (rank-major columns), as a LoraModule of A [E, r, in] and B [E, out, r]."""
    rank = A.shape[0] // experts
    per_expert_a = A.reshape(experts, rank, A.shape[1])  # [E, r, in]
    per_expert_b = B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)  # [E, out, r]
    return LoraModule(per_expert_a.contiguous(), per_expert_b.contiguous(), scaling)


@dataclass
class AdapterWeights:
    """A validated adapter: its modules keyed by the base module path (e.g. model.layers.0.self_attn.q_proj)."""

    name: str
    path: str
    modules: dict[str, LoraModule]
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank over the adapter's layers."""
        return max(m.rank for m in self.modules.values())

    @functools.cached_property
    def digest(self) -> str:
        """A SHA-256 of every module's path, scaling and A/B values: what the served weights are,
        whatever the adapter is called (prefix caching keys its blocks on it)."""
        sha = hashlib.sha256()
        for path in sorted(self.modules):
            module = self.modules[path]
            sha.update(f"{path}:{module.scaling!r}:{list(module.A.shape)}".encode())
            for tensor in (module.A, module.B):
                sha.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        return sha.hexdigest()

    @property
    def nbytes(self) -> int:
        """Bytes of all A and B tensors."""
        return sum(
            m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size()
            for m in self.modules.values()
        )


def weights_file(folder: Path) -> Path:
    """The adapter's safetensors file; pickle checkpoints are refused and never opened."""
    file = folder / WEIGHTS_FILE
    if file.is_file():
        return file
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"refusing pickle weights {', '.join(pickles)} (unsafe to load); "
            f"save the adapter as {WEIGHTS_FILE}",
            "pickle_weights_refused",
        )
    raise AdapterError(f"{WEIGHTS_FILE} is missing in {folder}", "missing_adapter_weights")


def _expert_owner(module: str) -> str:
    """The experts module a chain of PEFT's nested ParamWrappers (...experts.base_layer...) wraps."""
    return re.sub(rf"({re.escape(EXPERT_CHAIN)})+$", "", module)


def _module_of(key: str, shapes: Shapes) -> tuple[str, str]:
    """(base module path, "A" or "B") of a PEFT tensor key; keys of non-LoRA parts are refused."""
    short = key.removeprefix(PEFT_PREFIX)
    match = LORA_KEY.fullmatch(short)
    if match is None:
        for pattern, what in UNSUPPORTED_KEYS:
            if pattern.search(short):
                raise AdapterError(
                    f"unsupported adapter: tensor {key!r} holds {what}", "unsupported_adapter"
                )
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_FILE}", "unexpected_tensor")
    module = match.group("module")
    owner = _expert_owner(module)
    if any(path.startswith(f"{owner}.") and len(dims) == 3 for path, dims in shapes.items()):
        return module, match.group("side")  # a fused-expert parameter, resolved by _expert_param
    if module not in shapes:
        if is_embedding_or_head(module):
            raise AdapterError(
                f"unsupported adapter: LoRA on {module!r}; only decoder linear layers are served",
                "unsupported_adapter",
            )
        raise AdapterError(
            f"target module {module!r} (tensor {key!r}) is not a decoder linear layer of the base",
            "unknown_target_module",
        )
    return module, match.group("side")


def _check_module(
    module: str,
    sides: dict[str, tuple[str, list[int], str]],
    config: dict,
    shapes: Shapes,
    max_rank: int,
) -> float:
    """Check one module's A/B headers against the config and the base; returns its scaling."""
    if set(sides) != {"A", "B"}:
        have, lack = next(iter(sides)), ({"A", "B"} - set(sides)).pop()
        raise AdapterError(
            f"module {module!r} has lora_{have} but no lora_{lack}", "incomplete_lora_pair"
        )
    if not layer_allowed(config, module):
        raise AdapterError(
            f"tensors for {module!r} lie outside layers_to_transform "
            f"{config['layers_to_transform']!r}",
            "unexpected_tensor",
        )
    rank, scaling = module_rank_scaling(config, module)
    if rank > max_rank:
        raise AdapterError(
            f"module {module!r} has rank {rank}, above this server's max_rank {max_rank}",
            "rank_too_large",
        )
    in_features, out_features, *experts = shapes[module]
    rows = rank * (experts[0] if experts else 1)  # PEFT stacks the experts' ranks
    for side, want in (("A", [rows, in_features]), ("B", [out_features, rows])):
        key, shape, dtype = sides[side]
        if shape != want:
            raise AdapterError(
                f"tensor {key!r} has shape {shape}, expected {want} "
                f"(rank {rank} from the config, base layer in={in_features} out={out_features})",
                "shape_mismatch",
            )
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"tensor {key!r} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}",
                "invalid_dtype",
            )
    return scaling


def _read_headers(handle: Any, shapes: Shapes) -> Headers:
    """Each module's A/B (key, shape, dtype) from the file header, without reading tensor data."""
    headers: Headers = {}
    for key in handle.keys():
        module, side = _module_of(key, shapes)
        if side in headers.setdefault(module, {}):
            raise AdapterError(
                f"module {module!r} has two lora_{side} tensors", "unexpected_tensor"
            )
        piece = handle.get_slice(key)
        headers[module][side] = (key, list(piece.get_shape()), piece.get_dtype())
    if not headers:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA tensors", "empty_adapter")
    return {
        (module if module in shapes else _expert_param(module, sides, shapes)): sides
        for module, sides in headers.items()
    }


def _expert_param(chain: str, sides: dict[str, tuple[str, list[int], str]], shapes: Shapes) -> str:
    """The fused expert parameter (e.g. ...experts.gate_up_proj) that one of PEFT's nested
    ParamWrappers (...experts, ...experts.base_layer, ...) adapts, told apart by its in/out sizes."""
    owner = _expert_owner(chain)
    a_in = sides["A"][1][-1] if "A" in sides else None
    b_out = sides["B"][1][0] if "B" in sides else None
    fits = [
        path
        for path, dims in shapes.items()
        if path.startswith(f"{owner}.")
        and len(dims) == 3
        and a_in in (None, dims[0])
        and b_out in (None, dims[1])
    ]
    if len(fits) != 1:
        raise AdapterError(
            f"cannot tell which expert parameter of {owner!r} the tensors of {chain!r} adapt "
            f"({'none' if not fits else ' and '.join(fits)} fit their shapes)",
            "unknown_target_module",
        )
    return fits[0]


def _check_finite(modules: dict[str, LoraModule], headers: Headers) -> None:
    """Refuse NaN or Inf anywhere: one stacked check of per-tensor sums (NaN and Inf propagate
    into a sum), then, only if that fails, tensor by tensor to name the culprit (a sum of finite
    values may also overflow)."""
    sums = torch.stack([t.sum() for m in modules.values() for t in (m.A, m.B)])
    if bool(torch.isfinite(sums).all()):
        return
    for name, module in modules.items():
        for side, tensor in (("A", module.A), ("B", module.B)):
            if not torch.isfinite(tensor).all():
                key = headers[name][side][0]
                raise AdapterError(
                    f"tensor {key!r} contains NaN or Inf values", "non_finite_weights"
                )


def _lora_module(
    A: torch.Tensor, B: torch.Tensor, scaling: float, dims: tuple[int, ...]
) -> LoraModule:
    """The LoraModule of a module's A and B as stored (per expert for a fused expert parameter)."""
    return expert_lora(A, B, dims[2], scaling) if len(dims) == 3 else LoraModule(A, B, scaling)


def _header_module(
    sides: dict[str, tuple[str, list[int], str]], scaling: float, dims: tuple[int, ...]
) -> LoraModule:
    """One module's A and B as float32 tensors on the meta device: shapes only, no data read."""
    a, b = (torch.empty(sides[side][1], dtype=torch.float32, device="meta") for side in "AB")
    return _lora_module(a, b, scaling, dims)


def read_lora_tensors(
    file: Path,
    config: dict,
    shapes: Shapes,
    max_rank: int,
    max_bytes: int,
    header_only: bool = False,
) -> dict[str, LoraModule]:
    """The LoRA modules of a safetensors file as float32: headers checked first, then the values
    (header_only: meta tensors, values neither read nor checked)."""
    try:
        with safe_open(file, framework="pt") as handle:
            headers = _read_headers(handle, shapes)
            scalings = {
                m: _check_module(m, h, config, shapes, max_rank) for m, h in headers.items()
            }
            fp32_bytes = FLOAT32_BYTES * sum(
                shape[0] * shape[1] for sides in headers.values() for _, shape, _ in sides.values()
            )
            if fp32_bytes > max_bytes:
                raise AdapterError(
                    f"adapter holds {fp32_bytes} bytes as float32, "
                    f"above the limit of {max_bytes} bytes",
                    "adapter_too_large",
                )
            if header_only:
                return {
                    m: _header_module(headers[m], scalings[m], shapes[m]) for m in sorted(headers)
                }
        keys = [key for sides in headers.values() for key, _, _ in sides.values()]
        values, finite = read_float32(file, keys)
        modules = {
            m: _lora_module(
                values[headers[m]["A"][0]], values[headers[m]["B"][0]], scalings[m], shapes[m]
            )
            for m in sorted(headers)
        }
        if not finite:
            _check_finite(modules, headers)
        return modules
    except AdapterError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
        raise AdapterError(
            f"corrupt or truncated {WEIGHTS_FILE}: {error}", "corrupt_adapter_weights"
        ) from error


def base_linear_shapes(model: nn.Module) -> Shapes:
    """(in_features, out_features) of every decoder linear an adapter may target, by module path,
    and (in_features, out_features, experts) of every fused expert parameter (PEFT's path for it)."""
    # Imported here: adapters.layer and adapters.experts import this module for LoraModule.
    from adapters.experts import expert_param_dims
    from adapters.layer import decoder_linear_names

    linears = {
        name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features)
        for name in decoder_linear_names(model)
    }
    return {**linears, **expert_param_dims(model)}


def read_adapter(
    path: str | Path,
    name: str,
    shapes: Shapes,
    max_rank: int,
    max_bytes: int,
    base_fingerprint: dict | None = None,
    header_only: bool = False,
) -> AdapterWeights:
    """A PEFT LoRA folder as float32 A/B per base module, or an AdapterError (with a code) that
    says why the base cannot serve it.

    shapes maps each wrappable base module path to (in_features, out_features); max_bytes bounds
    both the weights file and the float32 tensors it expands to; base_fingerprint, when given, must
    equal the one in our trainer's manifest (when the adapter has one). header_only runs every check
    that needs no tensor values and returns meta tensors (rank and nbytes are exact).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist", "adapter_not_found")
    config = read_adapter_config(folder)
    check_targets(config, shapes)
    manifest = read_manifest(folder, base_fingerprint)
    file = weights_file(folder)
    size = file.stat().st_size
    if size > max_bytes:
        raise AdapterError(
            f"{file.name} is {size} bytes, above the limit of {max_bytes} bytes",
            "adapter_too_large",
        )
    modules = read_lora_tensors(file, config, shapes, max_rank, max_bytes, header_only)
    weights = AdapterWeights(name, str(folder), modules, config, manifest)
    if not header_only:
        _ = weights.digest  # hashed here, on the reading thread, never on the engine's step loop
    return weights

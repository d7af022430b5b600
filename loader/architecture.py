"""What the engine must know of a base's architecture, read from the model itself at load time.

A two-token probe forward, called as the engine calls the model, records for every attention call
the layer, the K/V shapes and the arguments transformers passes (sliding window, logit softcap,
attention sinks, scaling); a second one reads the masks transformers builds for eager attention, so
that each layer is described as eager attention computes it. The engine sizes its KV pool per layer
from the result and its paged attention computes each layer from it. What the engine cannot compute
exactly is refused here, before serving: layers that are not softmax attention (they keep recurrent
or convolution state), non-causal attention, masks or biases of the model's own, and any attention
argument the paged attention does not implement.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from loader.errors import ModelSourceError

PROBE_NAME = "loraplex_probe"
MASK_PROBE_NAME = "loraplex_mask_probe"
# attention arguments the paged attention implements (the values are honoured per layer)
HANDLED_ARGUMENTS = ("sliding_window", "softcap", "s_aux")
# arguments transformers forwards to every attention function that do not change the maths
PASSTHROUGH_ARGUMENTS = frozenset(
    {"position_ids", "use_cache", "output_router_logits", "output_attentions", "cache_position"}
)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# module classes that keep per-sequence state across tokens (SSM, linear attention, short convs)
STATEFUL_MODULE = re.compile(
    r"Mamba|DeltaNet|LinearAttention|ShortConv|Recurrent|Rwkv|RWKV|Ssm|SSM"
)


STEP_MARKER = object()  # stands for the engine's attn_batch in the probe


class UnsupportedArchitecture(ModelSourceError):
    """The base uses a model feature the engine cannot serve exactly."""


@dataclass(frozen=True)
class LayerAttention:
    """One attention layer as the engine sees it: KV shapes and the arguments that change the maths."""

    layer: int
    kv_heads: int
    k_dim: int
    v_dim: int
    sliding_window: int | None
    softcap: float | None
    sinks: bool

    def describe(self) -> str:
        """A short list of the layer's attention features ('full' when it has none)."""
        parts = [f"window {self.sliding_window}"] if self.sliding_window else []
        parts += [f"softcap {self.softcap:g}"] if self.softcap else []
        parts += ["sinks"] if self.sinks else []
        return ", ".join(parts) or "full"


@dataclass(frozen=True)
class Architecture:
    """The attention layers of a base (index = the layer's KV pool)."""

    model_type: str
    layers: tuple[LayerAttention, ...]

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V bytes of one cached token over all layers."""
        return sum(a.kv_heads * (a.k_dim + a.v_dim) for a in self.layers) * dtype.itemsize

    def features(self) -> str:
        """Distinct attention features over the layers, e.g. 'window 4096, softcap 50 | full'."""
        return " | ".join(dict.fromkeys(a.describe() for a in self.layers))


def _refuse(model: PreTrainedModel, what: str) -> UnsupportedArchitecture:
    """The start-up refusal for one unsupported feature of model."""
    return UnsupportedArchitecture(
        f"loraplex cannot serve {model.config.model_type!r} ({type(model).__name__}) exactly: "
        f"{what}. Refusing it rather than serving wrong output."
    )


def _check_layer_types(model: PreTrainedModel) -> None:
    """Refuse configs declaring layers that are not softmax attention (linear attention, SSM...)."""
    layer_types = getattr(model.config, "layer_types", None) or []
    others = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
    if others:
        where = [i for i, t in enumerate(layer_types) if t in others]
        raise _refuse(
            model,
            f"layers {where} are of type {', '.join(others)}, which keep per-sequence recurrent "
            "or convolution state that the engine does not hold (only "
            f"{' and '.join(ATTENTION_LAYER_TYPES)} layers are served)",
        )


def _check_stateful_modules(model: PreTrainedModel) -> None:
    """Refuse decoder modules that carry state between tokens outside the KV cache."""
    for name, module in model.named_modules():
        stateful = isinstance(module, nn.Conv1d) or STATEFUL_MODULE.search(type(module).__name__)
        if ".layers." in f".{name}" and stateful:
            raise _refuse(
                model,
                f"{name} is a {type(module).__name__}, a layer with recurrent or convolution state "
                "that the engine does not keep per sequence",
            )


def _run(model: PreTrainedModel, name: str, tokens: int) -> None:
    """One forward of `tokens` tokens with attention implementation `name`, called as the engine
    calls the model (server/engine/runner.py); failures become refusals."""
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    model.set_attn_implementation(name)
    try:
        with torch.inference_mode():
            model(
                input_ids=torch.arange(1, tokens + 1, device=device)[None],
                position_ids=torch.arange(tokens, device=device)[None],
                use_cache=False,
                logits_to_keep=torch.tensor([tokens - 1], device=device),
                attn_batch=STEP_MARKER,
            )
    except UnsupportedArchitecture:
        raise
    except Exception as error:  # noqa: BLE001 - whatever breaks here would break every step
        raise _refuse(
            model, f"its forward fails when called as the engine calls it ({error!r})"
        ) from error
    finally:
        model.set_attn_implementation(previous)


def _no_output(query: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, None]:
    """A probe's attention result: zeros of the shape attention returns.  -> [B, T, H, Dv]"""
    batch, heads, tokens, _ = query.shape  # [B, H, T, D]
    return query.new_zeros(batch, tokens, heads, value.shape[-1]), None


def _probe(model: PreTrainedModel) -> list[tuple[nn.Module, torch.Tensor, dict]]:
    """(module, key, arguments) of every attention call in a two-token forward, run as the engine
    runs it: no mask is built for its attention function."""
    calls: list[tuple[nn.Module, torch.Tensor, dict]] = []

    def record(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        if kwargs.pop("attn_batch", None) is not STEP_MARKER:
            raise _refuse(
                model,
                f"{type(module).__name__} does not pass the forward's keyword arguments on to its "
                "attention function (the engine sends each step's KV placement that way)",
            )
        if attention_mask is not None:  # no causal mask is built for the engine's function
            raise _refuse(
                model,
                f"{type(module).__name__} adds its own attention mask or bias (the engine's paged "
                "attention applies only causal order, windows, softcaps and sinks)",
            )
        calls.append(
            (module, key, {"value_dim": value.shape[-1], "heads": query.shape[1], **kwargs})
        )
        return _no_output(query, value)

    AttentionInterface.register(PROBE_NAME, record)
    _run(model, PROBE_NAME, 2)
    return calls


def _masks(model: PreTrainedModel) -> dict[int, torch.Tensor]:
    """Per layer, the boolean mask [4, 4] (query, key) transformers builds for a 4-token forward with
    the config's sliding window shrunk to 2: what eager attention really applies."""
    masks: dict[int, torch.Tensor] = {}

    def record(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        causal = torch.ones(4, 4, dtype=torch.bool, device=query.device).tril()
        mask = causal if attention_mask is None else attention_mask[0, 0].bool()  # [q, kv]
        masks[module.layer_idx] = mask.cpu()
        return _no_output(query, value)

    def dense_mask(*args: object, **kwargs: object) -> torch.Tensor | None:
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})

    AttentionInterface.register(MASK_PROBE_NAME, record)
    ALL_MASK_ATTENTION_FUNCTIONS.register(MASK_PROBE_NAME, dense_mask)
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if window:
        text.sliding_window = 2
    try:
        _run(model, MASK_PROBE_NAME, 4)
    finally:
        if window:
            text.sliding_window = window
    return masks


def _reconcile(
    model: PreTrainedModel, layers: list[LayerAttention], masks: dict[int, torch.Tensor]
) -> list[LayerAttention]:
    """Layers as eager attention computes them: a sliding_window argument whose mask is plain causal
    is dropped (eager and SDPA ignore the argument), a window in the mask alone is refused."""
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    served = []
    for attention in layers:
        mask = masks.get(attention.layer, causal)
        if bool((mask & ~causal).any()):
            raise _refuse(
                model, f"layer {attention.layer} attends to later tokens (non-causal mask)"
            )
        windowed = not bool(mask[3, 0])  # with a window of 2, the 4th token does not see the 1st
        if windowed and not attention.sliding_window:
            raise _refuse(
                model,
                f"layer {attention.layer} restricts attention through a mask alone (a sliding "
                "window or chunks) that its attention function receives no argument for",
            )
        if attention.sliding_window and not windowed:
            attention = dataclasses.replace(attention, sliding_window=None)
        served.append(attention)
    return served


def _layer(
    model: PreTrainedModel, module: nn.Module, key: torch.Tensor, args: dict
) -> LayerAttention:
    """The LayerAttention of one recorded call, refusing arguments the engine does not implement."""
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise _refuse(model, f"attention module {type(module).__name__} has no layer_idx")
    if getattr(module, "is_causal", True) is False:
        raise _refuse(model, f"layer {layer} runs bidirectional (non-causal) attention")
    if args["heads"] % key.shape[1]:
        raise _refuse(
            model,
            f"layer {layer} has {args['heads']} query heads over {key.shape[1]} KV heads (grouped "
            "attention needs a whole number of query heads per KV head)",
        )
    known = {"value_dim", "heads", "scaling", "dropout", *HANDLED_ARGUMENTS, *PASSTHROUGH_ARGUMENTS}
    unknown = {k: v for k, v in args.items() if k not in known and v is not None}
    if unknown:
        raise _refuse(
            model,
            f"layer {layer} passes attention arguments {sorted(unknown)} that loraplex's paged "
            f"attention does not implement (it honours {', '.join(HANDLED_ARGUMENTS)} and scaling)",
        )
    window, softcap = args.get("sliding_window"), args.get("softcap")
    return LayerAttention(
        layer=layer,
        kv_heads=key.shape[1],  # key [B, Hkv, T, Dk]
        k_dim=key.shape[-1],
        v_dim=int(args["value_dim"]),
        sliding_window=int(window) if window else None,
        softcap=float(softcap) if softcap else None,
        sinks=args.get("s_aux") is not None,
    )


def inspect_architecture(model: PreTrainedModel) -> Architecture:
    """The base's attention layers, or UnsupportedArchitecture naming what cannot be served."""
    _check_layer_types(model)
    _check_stateful_modules(model)
    parameters = inspect.signature(model.forward).parameters
    for needed, why in (
        ("position_ids", "each packed token's position"),
        ("logits_to_keep", "logits of the sampled rows only"),
    ):
        if needed not in parameters:
            raise _refuse(model, f"its forward takes no {needed} (the engine passes {why})")
    layers = sorted((_layer(model, *call) for call in _probe(model)), key=lambda a: a.layer)
    count = model.config.get_text_config().num_hidden_layers
    indices = [a.layer for a in layers]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise _refuse(
            model,
            f"its attention calls (layers {indices}) do not map one to one onto its {count} "
            f"decoder layers: layers {missing} run no softmax attention (they keep state the engine "
            "does not hold) or some layer attends twice (cross-attention)",
        )
    layers = _reconcile(model, layers, _masks(model))
    return Architecture(model.config.model_type, tuple(layers))

"""The synchronous engine: requests in, one batched forward per step, tokens out."""

from __future__ import annotations

import logging

import torch

from adapters.experts import attach_multi_lora_experts
from adapters.format import AdapterWeights, base_linear_shapes, read_adapter
from adapters.layer import StepRouting, attach_multi_lora
from adapters.registry import AdapterRegistry
from adapters.slots import SlotTable
from adapters.train.manifest import base_fingerprint
from loader.architecture import inspect_architecture
from loader.config import Config
from loader.memory import device_memory_bytes
from loader.model import BaseModel
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.grammar import advance, constrain
from server.engine.kv_cache import KVCache
from server.engine.runner import ModelRunner
from server.engine.sampler import sample, score
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, Status
from server.engine.types import (
    EngineError,
    EngineStats,
    Logprob,
    SamplingParams,
    TokenOutput,
)

log = logging.getLogger("loraplex.engine")


def eos_token_ids(base: BaseModel) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS and the generation config's."""
    ids = {base.tokenizer.eos_token_id}
    configured = getattr(base.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


class EngineCore:
    """Continuous batching over one resident base with per-token adapter slots."""

    def __init__(self, base: BaseModel, config: Config, lora_op: str | None = None) -> None:
        self.base = base
        self.config = config
        model, hf = base.model, base.model.config
        device = str(next(model.parameters()).device)
        self.arch = inspect_architecture(model)  # refuses what cannot be served exactly
        log.info("architecture %s: attention %s", self.arch.model_type, self.arch.features())
        # Triton BGMV kernels on CUDA, grouped batched GEMMs on CPU (see adapters/lora_ops.py)
        lora_op = lora_op or ("triton" if device.startswith("cuda") else "grouped")
        slots, lora_dtype = config.slot_count, config.torch_lora_dtype
        self.routing = StepRouting(slots, lora_op, device, config.max_lora_rank)
        self.layers = attach_multi_lora(model, self.routing, lora_dtype)
        # fused MoE experts: LoRA on their 3-D weights (PEFT target_parameters) shares the slots
        experts = attach_multi_lora_experts(model, self.routing, lora_dtype)
        budget = config.adapter_memory_bytes(device_memory_bytes(device))
        self.slots = SlotTable(
            {**self.layers, **experts}, slots, budget, config.max_lora_rank, lora_dtype
        )
        log.info("adapter memory: %.1f MiB on %s (--adapter-memory %s)", budget / 2**20, device,
                 config.adapter_memory)  # fmt: skip
        self.shapes = base_linear_shapes(model)
        self.fingerprint = base_fingerprint(base)  # compared with trainer manifests
        self.registry = AdapterRegistry(self.read_adapter, config.max_cpu_loras)
        self._registry_changes = 0
        self.kv = KVCache(
            self.arch.layers,
            config.kv_capacity_tokens,
            config.block_size,
            config.torch_compute_dtype,
            device,
            config.enable_prefix_caching,
        )
        if self.kv.prefix is not None:
            log.info("prefix caching on (scope %s)", config.prefix_cache_scope)
        elif config.enable_prefix_caching:
            log.info(
                "prefix caching off: every attention layer of %s slides, so blocks behind the "
                "window are freed and a cached prefix would have holes",
                self.arch.model_type,
            )
        self.scheduler = Scheduler(config, self.kv, self.slots, self.registry)
        context = config.max_model_len or hf.max_position_embeddings
        self.max_model_len = min(context, self.kv.longest_sequence(config.max_batch_tokens))
        graphs = None
        if experts and config.cuda_graphs and device.startswith("cuda"):
            log.info("CUDA graphs off: MoE experts route tokens data-dependently (eager steps)")
        elif config.cuda_graphs and device.startswith("cuda") and lora_op == "triton":
            graphs = DecodeGraphs(
                model, self.kv, self.routing, config.max_num_seqs, self.max_model_len
            )
        self.runner = ModelRunner(model, self.kv, self.routing, graphs)
        self.eos_ids = eos_token_ids(base)
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.generated_tokens = 0

    # adapters -----------------------------------------------------------------------------
    def read_adapter(self, name: str, path: str, header_only: bool = False) -> AdapterWeights:
        """Read and validate an adapter folder against the served base and the device's adapter
        budget (no engine state touched)."""
        cfg = self.config
        weights = read_adapter(
            path,
            name,
            self.shapes,
            cfg.max_lora_rank,
            cfg.max_adapter_bytes,
            self.fingerprint,
            header_only=header_only,
        )
        self.slots.check(weights)
        return weights

    def close(self) -> None:
        """Stop the adapter loader thread."""
        self.registry.close()

    def add_adapter(self, weights: AdapterWeights) -> None:
        """Make already read weights servable (replacing one of the same name for new requests)."""
        self.slots.check(weights)
        self.registry.register(weights.name, weights.path, weights, source="engine")

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter; requests already running on it finish normally."""
        self.registry.unregister(name)

    def _sync_adapters(self) -> None:
        """Detach the device slots of adapter versions replaced or removed since the last step."""
        changes = self.registry.changes
        if changes != self._registry_changes:
            self._registry_changes = changes
            self.slots.retain(self.registry.is_current)
            self.kv.invalidate(self.registry.is_current)

    # requests -----------------------------------------------------------------------------
    def check_request(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams
    ) -> None:
        """Raise EngineError if a request cannot be accepted as it is."""
        if adapter is not None and adapter not in self.registry:
            raise EngineError(f"The model `{adapter}` does not exist.", "model_not_found", 404)
        if not prompt_ids:
            raise EngineError("The prompt is empty.", "invalid_prompt", 400)
        if len(prompt_ids) >= self.max_model_len:  # max_tokens is a cap: the context ends it
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {len(prompt_ids)}, which leaves no room for a completion.",
                "context_length_exceeded",
                400,
            )

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        cache_namespace: str = "",
    ) -> Sequence:
        """Validate and queue a request; it shares cached prefix blocks only with requests of the
        same adapter weights and the same cache_namespace."""
        if request_id in self.seqs:
            raise EngineError(f"duplicate request id {request_id!r}", "duplicate_request", 400)
        self.check_request(prompt_ids, adapter, params)
        seq = Sequence(
            request_id, list(prompt_ids), adapter, params, cache_namespace=cache_namespace
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> TokenOutput | None:
        """Stop a request now, freeing its KV blocks and slot pin."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        return TokenOutput(request_id, None, "abort", prompt_tokens=len(seq.prompt_ids))

    def fail_all(self, message: str) -> list[TokenOutput]:
        """End every waiting and running request with an error (after a step failed midway)."""
        return [self._fail(seq, message) for seq in list(self.seqs.values())]

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[TokenOutput]:
        """Schedule, run one forward for every scheduled token, sample, and report new tokens
        (and the ends of waiting requests whose adapter cannot be served)."""
        self._sync_adapters()
        batch = self.scheduler.schedule()
        outputs = [self._fail(seq, reason, code) for seq, reason, code in batch.failed]
        if not batch.items:
            return outputs
        self.steps += 1
        try:
            step, logits, prompt_logits = self.runner.run(batch)
        except Exception as error:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("forward failed; failing %d requests", len(batch.items))
            outputs += [self._fail(seq, f"internal error: {error}") for seq, _ in batch.items]
            return outputs
        for seq, n in batch.items:
            seq.num_computed += n
            self.kv.trim(seq)
            self._offer_blocks(seq)
        failed = self._score_prompts(step.prompt_scores, prompt_logits)
        outputs += [self._fail(seq, "non-finite logits") for seq in failed]
        finite = torch.isfinite(logits).all(-1).tolist()
        healthy, rows = [], []
        for row, (seq, ok) in enumerate(zip(step.sample_seqs, finite, strict=True)):
            if seq in failed:
                continue
            if not ok:
                outputs.append(self._fail(seq, "non-finite logits"))
            elif seq.params.max_tokens == 0:  # the prompt alone was to be scored
                outputs.append(self._finish_unsampled(seq))
            else:
                healthy.append(seq)
                rows.append(row)
        raw = logits[rows]  # [N, V]
        drawn = sample(constrain(raw, healthy), healthy, raw, self.eos_ids)
        for seq, token in zip(healthy, drawn, strict=True):
            if not advance(seq, token.token_id):
                outputs.append(self._fail(seq, "the grammar refused the sampled token"))
                continue
            outputs.append(self._append(seq, token.token_id, token.logprob, token.top_logprobs))
        return outputs

    def _score_prompts(
        self, spans: list[tuple[Sequence, int, int, int]], logits: torch.Tensor
    ) -> list[Sequence]:
        """Append to each sequence's prompt_logprobs the scores of the prompt tokens its rows of
        logits [P, V] predict; the sequences whose rows are not finite."""
        failed, offset = [], 0
        for seq, first, _, count in spans:
            rows = logits[offset : offset + count]  # [count, V]
            offset += count
            if not bool(torch.isfinite(rows).all()):
                failed.append(seq)
                continue
            targets = torch.tensor(
                seq.prompt_ids[first + 1 : first + 1 + count], device=rows.device
            )
            seq.prompt_logprobs.extend(score(rows, targets, seq.params.prompt_logprobs or 0))
        return failed

    def _offer_blocks(self, seq: Sequence) -> None:
        """Put seq's newly full blocks in the prefix cache, unless its adapter version was replaced
        or unloaded meanwhile (its K/V must never serve the new version)."""
        prefix = self.kv.prefix
        if prefix is None:
            return
        owner = self.slots.keys[seq.slot] if seq.slot >= 0 else None
        if owner is None or self.registry.is_current(owner):
            prefix.insert(seq, owner)

    def _append(
        self, seq: Sequence, token: int, logprob: float | None, top: list[tuple[int, float]]
    ) -> TokenOutput:
        seq.output_ids.append(token)
        self.generated_tokens += 1
        params = seq.params
        reason = None
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.length >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.finish(seq)
        return TokenOutput(
            seq.request_id,
            token,
            reason,
            logprob,
            top,
            len(seq.prompt_ids),
            cached_tokens=seq.cached_tokens or 0,
            prompt_logprobs=self._prompt_logprobs(seq) if len(seq.output_ids) == 1 else None,
        )

    def _finish_unsampled(self, seq: Sequence) -> TokenOutput:
        """End a request whose prompt was scored and that asked for no tokens (max_tokens 0)."""
        self.seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return TokenOutput(
            seq.request_id,
            None,
            "length",
            prompt_tokens=len(seq.prompt_ids),
            prompt_logprobs=self._prompt_logprobs(seq),
        )

    @staticmethod
    def _prompt_logprobs(seq: Sequence) -> list[Logprob | None] | None:
        return seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None

    def _fail(self, seq: Sequence, message: str, code: str | None = None) -> TokenOutput:
        self.seqs.pop(seq.request_id, None)
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
        return TokenOutput(
            seq.request_id,
            None,
            "error",
            prompt_tokens=len(seq.prompt_ids),
            error=message,
            error_code=code,
        )

    def stats(self) -> EngineStats:
        """A snapshot of queues, KV usage, adapter tiers and counters."""
        host_adapters, host_bytes = self.registry.host_usage()
        prefix = self.kv.prefix
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_used_blocks=self.kv.used_blocks,
            kv_total_blocks=self.kv.num_blocks,
            resident_adapters=len(self.slots.resident_names),
            steps=self.steps,
            preemptions=self.scheduler.preemptions,
            generated_tokens=self.generated_tokens,
            host_adapters=host_adapters,
            adapter_host_bytes=host_bytes,
            adapter_device_bytes=self.slots.used_bytes,
            adapter_memory_budget=self.slots.budget_bytes,
            adapter_loads=self.registry.loads,
            adapter_slot_loads=self.slots.placements,
            adapter_pins=sum(self.slots.pins),
            prefix_cached_blocks=self.kv.cached_blocks,
            prefix_queried_tokens=dict(prefix.queried) if prefix else {},
            prefix_hit_tokens=dict(prefix.hits) if prefix else {},
        )

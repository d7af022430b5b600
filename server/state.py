"""What the routes share: the engine, config, metrics, and how a request becomes a Generation."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fastapi import Request

from loader.config import Config
from server.auth import current_key
from server.engine.types import SamplingParams
from server.generation import Generation, OutputOptions
from server.metrics import Metrics
from server.structured import Grammars
from server.translate import resolve_model


@dataclass
class ServerState:
    """The app's engine, config and metrics (stored on app.state.loraplex)."""

    engine: Any
    config: Config
    metrics: Metrics
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def base_name(self) -> str:
        """The id of the bare base model in the API."""
        return self.engine.base.name

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (chat template, detokenization)."""
        return self.engine.base.tokenizer

    @cached_property
    def grammars(self) -> Grammars:
        """The structured-output grammar compiler over the base tokenizer and the engine's EOS."""
        head = self.engine.base.model.get_output_embeddings()  # its rows are the logits' columns
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        return Grammars(self.tokenizer, vocab, self.engine.core.eos_ids, self.config)

    def resolve(self, model: str) -> str | None:
        """The adapter `model` names (None for the base), the request counted in the per-adapter
        metrics; 404 model_not_found if it is unknown."""
        self.metrics.count_request(model)
        return resolve_model(model, self.base_name, self.engine.adapter_names())

    def generation(
        self,
        model: str,
        adapter: str | None,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        options: OutputOptions,
        request_id: str,
        cache_namespace: str = "",
    ) -> Generation:
        """The engine requests for `model` (resolved to `adapter` by `resolve`), their tokens
        counted in the per-adapter metrics."""
        on_token = self.metrics.token_observer(model)
        return Generation(
            self.engine,
            self.tokenizer,
            prompts,
            adapter,
            params,
            n,
            options,
            request_id,
            self.config.request_timeout_s,
            on_token,
            cache_namespace,
        )

    def cache_namespace(self, request: Request, salt: str | None) -> str:
        """Which cached prefixes a request may share: those of its API key under
        `--prefix-cache-scope key` (else every key's), with the same cache_salt."""
        tenant = ""
        if self.config.prefix_cache_scope == "key":
            tenant = hashlib.sha256(current_key(request).key.encode()).hexdigest()
        return json.dumps([tenant, salt or ""])


def get_state(request: Request) -> ServerState:
    """The ServerState of the app serving request."""
    return request.app.state.loraplex

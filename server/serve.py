"""`loraplex serve`: load the base once and report readiness."""

from __future__ import annotations

import logging
import time

from loader.memory import memory_report
from loader.model import load_base
from server.config import Config

log = logging.getLogger("loraplex.serve")


def serve(config: Config) -> int:
    """Load the base model, log the memory report and the ready line."""
    started = time.perf_counter()
    base = load_base(config)
    log.info("%s", memory_report(base.model).format())
    log.info(
        "ready: %s loaded from %s in %.1fs (quant=%s)",
        base.name,
        base.path,
        time.perf_counter() - started,
        config.quant,
    )
    return 0

"""`loraplex serve`: load the base, start the engine with the adapters folder, serve HTTP with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import uvicorn

from adapters.train.demo import DemoTrainer
from loader.config import Config, ConfigError
from loader.memory import memory_report
from loader.model import load_base
from server.shutdown import DrainingServer

log = logging.getLogger("loraplex.serve")

GRACEFUL_SHUTDOWN_S = 5
EXIT_ENGINE_DEAD = 70  # EX_SOFTWARE: the engine died; restart the process
DEAD_POLL_S = 0.1
DEAD_DRAIN_S = 2.0  # after the engine died: time for the error responses to reach their clients


def load_adapters_dir(engine: Any, folder: str | None) -> list[str]:
    """Register each adapter subfolder of folder under its name (bad ones are logged and skipped);
    once started, the engine keeps watching the folder."""
    if folder is None:
        return []
    if not Path(folder).is_dir():
        raise ConfigError(f"--adapters {folder}: no such folder")
    return engine.scan_adapters().added


def demo_trainer(config: Config) -> DemoTrainer | None:
    """The background trainer of the demo adapters missing from the adapters folder, when
    --train-demo-adapters asks for it and they can be trained (else None, having logged why not)."""
    if not config.train_demo_adapters:
        return None
    if config.model != "demo":
        log.info("not training the demo adapters: they are for the demo base, not %s", config.model)
        return None
    if config.adapters_dir is None:
        log.info("not training the demo adapters: no --adapters folder to serve them from")
        return None
    trainer = DemoTrainer(Path(config.adapters_dir), config)
    return trainer if trainer.tasks else None


def demo_note(trainer: DemoTrainer | None, config: Config) -> str:
    """What the ready line says about the demo adapters being trained ("" when none are)."""
    if trainer is None:
        return ""
    count = len(trainer.tasks)
    served = (
        "each is served as it finishes"
        if config.adapters_poll_s
        else "restart to serve them (--adapters-poll-s 0 does not watch the folder)"
    )
    return (
        f"; training {count} demo adapter{'s' * (count > 1)} in the background "
        f"({', '.join(trainer.tasks)}), {served}"
    )


def url_of(host: str, port: int) -> str:
    """http://host:port, with IPv6 hosts in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def run_http(app: Any, config: Config, ready: str) -> int:
    """Serve app until a signal drains and stops it (server.shutdown); log the ready line (with the
    bound URL) once listening."""
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="info",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ),
        app.state.drain,
        app.state.loraplex.engine,
        config.shutdown_grace_s,
    )
    engine = app.state.loraplex.engine
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        url = url_of(config.host, server.servers[0].sockets[0].getsockname()[1])
        log.info("ready: %s %s; console: %s/ui", url, ready, url)
    watchdog = asyncio.create_task(exit_when_dead(engine, server))
    await task
    watchdog.cancel()
    if engine.dead is not None:
        return EXIT_ENGINE_DEAD
    return 0 if server.started else 1


async def exit_when_dead(engine: Any, server: DrainingServer) -> None:
    """Once the engine's loop has died, let the error responses flush, then stop serving (the
    process exits non-zero so a supervisor restarts it)."""
    while engine.dead is None:
        await asyncio.sleep(DEAD_POLL_S)
    log.critical("engine dead (%s): exiting in %.0f s", engine.dead, DEAD_DRAIN_S)
    await asyncio.sleep(DEAD_DRAIN_S)
    server.should_exit = True


def serve(config: Config) -> int:
    """Load the base and adapters, start the engine and serve the API until interrupted."""
    from server.app import create_app
    from server.engine.engine import AsyncEngine

    started = time.perf_counter()
    base = load_base(config)
    log.info("%s", memory_report(base.model).format())
    engine = AsyncEngine(base, config)
    trainer = demo_trainer(config)  # creates the adapters folder it trains into
    adapters = load_adapters_dir(engine, config.adapters_dir)
    engine.start()
    try:
        app = create_app(engine, config)
        if trainer is not None:
            trainer.start()
        ready = (
            f"(model {base.name} from {base.path}, {len(adapters)} adapters, quant={config.quant}, "
            f"loaded in {time.perf_counter() - started:.1f}s){demo_note(trainer, config)}"
        )
        return asyncio.run(run_http(app, config, ready))
    finally:
        if trainer is not None:
            trainer.stop()
        engine.shutdown()

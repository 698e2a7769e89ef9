"""The app factory: builds the FastAPI app around an engine; nothing happens at import.

Owns: `create_app(config, engine=None)`, the lifespan (start the engine, wait
for the model in the background, register the adapter store, shut the engine
down in `finally`), and the wiring of middleware, error handlers and routers.
Tests pass their own engine (usually `FakeEngine`); `loraplex serve` passes
none and gets the `TorchEngine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import resolvers
from .api import errors as api_errors
from .api.admin import router as admin_router
from .api.deps import AppState, BodyLimitMiddleware, RequestIdMiddleware
from .api.jobs import router as jobs_router
from .api.models import router as models_router
from .api.openai import router as openai_router
from .api.ops import router as ops_router
from .api.responses import router as responses_router
from .api.ui import router as ui_router
from .config import Config
from .engine.protocol import Engine
from .jobs import JobManager
from .metrics import Metrics
from .registry import Registry
from .watch import StoreWatcher

log = logging.getLogger("loraplex.app")


def build_engine(config: Config, metrics: Metrics) -> Engine:
    from .engine.loop import TorchEngine  # torch is imported only when a real engine is wanted

    template = config.model.chat_template
    model_cfg = dataclasses.replace(config.model, chat_template=str(config.path(template)) if template else "")
    return TorchEngine(model_cfg, config.engine, cache_dir=config.path(config.model.cache_dir),
                       max_lora_rank=config.adapters.max_lora_rank, slots=config.adapters.max_loaded_adapters,
                       host_adapters=config.adapters.max_cpu_adapters, on_step=metrics.engine_step)


def _state_gauges(metrics: Metrics, engine: Engine, registry: Registry) -> None:
    def count(key: str):
        return lambda: registry.counts()[key]
    metrics.gauge("loraplex_requests_running", "Requests in the engine's running batch",
                  lambda: engine.stats().running)
    metrics.gauge("loraplex_requests_waiting", "Requests waiting for a place in a batch",
                  lambda: engine.stats().waiting)
    metrics.gauge("loraplex_kv_cache_tokens", "Token positions in KV-cache blocks in use",
                  lambda: engine.stats().kv_cache_tokens)
    metrics.gauge("loraplex_kv_cache_capacity_tokens", "Token positions the KV pool holds",
                  lambda: engine.stats().kv_cache_capacity_tokens)
    metrics.counter("loraplex_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                    lambda: engine.stats().prefix_cache_queries)
    metrics.counter("loraplex_prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed)",
                    lambda: engine.stats().prefix_cache_hits)
    metrics.counter("loraplex_preemptions", "Sequences preempted (recomputed later) when the KV pool ran out",
                    lambda: engine.stats().preemptions)
    metrics.counter("loraplex_admission_waits", "Requests that arrived while a batch ran and waited for it",
                    lambda: engine.stats().admission_waits)
    metrics.gauge("loraplex_gpu_memory_allocated_bytes", "GPU memory allocated by torch",
                  lambda: engine.stats().gpu_memory_bytes)
    metrics.gauge("loraplex_adapters_registered", "Adapters and blends registered", count("registered"))
    metrics.gauge("loraplex_adapters_loaded", "Adapters, blends and per-request mixes in memory", count("loaded"))
    metrics.gauge("loraplex_adapters_pinned", "Adapters pinned in memory", count("pinned"))
    metrics.gauge("loraplex_blends_registered", "Named blends registered", count("blends"))
    # For routers (a Kubernetes router, the Gateway API Inference Extension's endpoint picker):
    # where each adapter is, and vLLM's lora_requests_info in its label format (README, "Routers").
    metrics.gauge("loraplex_kv_cache_usage_ratio", "Fraction (0 to 1) of the KV pool's token positions in use",
                  lambda: (lambda st: st.kv_cache_tokens / st.kv_cache_capacity_tokens
                           if st.kv_cache_capacity_tokens else None)(engine.stats()))
    metrics.labelled_gauge("loraplex_adapter_resident", "1 for each registered adapter or blend, by tier: "
                           "memory (in a LoRA slot, served at once) or disk (loaded on its next request)",
                           ("adapter", "tier"),
                           lambda: [((e.name, "memory" if e.loaded else "disk"), 1.0) for e in registry.entries()])

    def lora_info() -> list[tuple[tuple[str, ...], float]]:
        st = engine.stats()
        return [((str(registry.capacity), ",".join(sorted(st.running_adapters)),
                  ",".join(sorted(st.waiting_adapters))), time.time())]
    metrics.labelled_gauge("loraplex_lora_requests_info", "The adapters of running and waiting requests and the "
                           "LoRA slots (vLLM's lora_requests_info); the value is the time of the reading",
                           ("max_lora", "running_lora_adapters", "waiting_lora_adapters"), lora_info)


def _clean_exports(folder) -> None:
    """Staging folders an export killed part-way left behind (a finished export is renamed into place)."""
    import shutil

    if folder.is_dir():
        for p in folder.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)


async def _warm_up(state: AppState, exit_on_failure: bool) -> None:
    """Wait for the model, then register the adapter store; /ready turns 200 after."""
    try:
        _clean_exports(state.config.path(state.config.train.exports_dir))
        await state.engine.wait_ready()
        names = await state.registry.start(scan_store=state.config.adapters.load_at_startup)
        log.info("adapters in memory at start-up: %s", ", ".join(names) or "none")
        state.adapters_ready = True
        log.info("ready: serving %s", state.engine.model_id)
    except Exception as e:
        state.load_error = f"start-up failed: {type(e).__name__}: {e}"
        log.critical(state.load_error)
        if exit_on_failure:  # a server without its model is no server: let the process end
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if state.config.adapters.watch:  # this task goes on as the store watcher; the lifespan cancels it
        await StoreWatcher(state.registry, state.config.adapters.watch_interval_s).run()


def create_app(config: Config, engine: Engine | None = None, *, exit_on_load_failure: bool = False) -> FastAPI:
    metrics = Metrics()
    engine = engine if engine is not None else build_engine(config, metrics)
    registry = Registry(engine, config.path(config.adapters.dir), capacity=config.adapters.max_loaded_adapters,
                        roots=[config.path(r) for r in config.adapters.roots], observer=metrics,
                        slot_wait_s=config.adapters.slot_wait_s,
                        resolvers=resolvers.from_config(config.adapters, config.path),
                        resolve_store=config.adapters.resolve_store)
    jobs = JobManager(config.path(config.adapters.dir) / ".loraplex" / "jobs",
                      max_queued=config.train.max_queued_jobs, on_finish=metrics.job_finished)
    _state_gauges(metrics, engine, registry)
    metrics.gauge("loraplex_jobs_running", "Background jobs running", lambda: jobs.count("running"))
    metrics.gauge("loraplex_jobs_queued", "Background jobs waiting", lambda: jobs.count("queued"))
    scopes = config.api_key_scopes()
    state = AppState(config=config, engine=engine, registry=registry, api_keys=list(scopes), key_scopes=scopes,
                     metrics=metrics, admin_token=config.admin_token(), jobs=jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        warm = asyncio.create_task(_warm_up(state, exit_on_load_failure))
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await jobs.shutdown()
            await asyncio.to_thread(engine.shutdown)

    # No /docs or /redoc (deny by default: every route has a class, see api/deps.route_class);
    # /openapi.json stays public for clients and fuzzers.
    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False)  # a 307 would answer before auth, echoing the client's Host
    app.state.loraplex = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.server.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    api_errors.install(app)
    app.include_router(ops_router)
    app.include_router(models_router)
    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(admin_router)
    app.include_router(jobs_router)
    if config.server.ui:
        app.include_router(ui_router)
    return app

"""The real engine on the tiny random model, started once per test module that asks for it."""

import asyncio

import pytest

from server.config import load_config
from server.engine.loop import TorchEngine


def start_engine(model_dir, store, cache_dir, adapters=("alpha", "beta"), **overrides) -> TorchEngine:
    """A ready TorchEngine in fp32 with `adapters` from `store` loaded; `overrides` are config keys."""
    cfg = load_config(overrides={"model.model": str(model_dir), "model.dtype": "float32", **overrides})
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=cache_dir)
    eng.start()

    async def setup():
        await eng.wait_ready()
        for name in adapters:
            await eng.load_adapter(name, store / name)
    asyncio.run(setup())
    return eng


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_store, tmp_path_factory):
    eng = start_engine(tiny_model_dir, tiny_store, tmp_path_factory.mktemp("cache"))
    yield eng
    eng.shutdown()

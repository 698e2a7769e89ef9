"""The engine's deadlines and watchdog on a tiny random Llama: late requests end with RequestTimeout and
leave the batch; a loop that stops coming round makes the engine not ready until it does again."""

import asyncio
import time

import pytest

from server.config import load_config
from server.engine.loop import TorchEngine
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import RequestTimeout


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    cfg = load_config(overrides={"model.model": str(tiny_model_dir), "model.dtype": "float32",
                                 "engine.stall_timeout_s": 0.6})
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path_factory.mktemp("cache"))
    eng.start()
    asyncio.run(eng.wait_ready())
    yield eng
    eng.shutdown()


def request(engine, rid, deadline, max_tokens=200):
    return GenerationRequest(rid, engine.tokenizer.encode("hello world"),
                             SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                             deadline=deadline)


def test_deadline_ends_running_and_waiting_requests(engine):
    async def main():
        late = request(engine, "late", time.monotonic() - 1)          # already past: never prefilled
        slow = request(engine, "slow", time.monotonic() + 0.15, 240)  # ends mid-generation
        fine = request(engine, "fine", None, 5)
        results = {}

        async def run(r):
            got = 0
            try:
                async for ev in engine.submit(r):
                    got += len(ev.token_ids)
                results[r.request_id] = ("done", got)
            except RequestTimeout as e:
                results[r.request_id] = (e.code, got)
        await asyncio.gather(*(run(r) for r in (late, slow, fine)))
        return results
    results = asyncio.run(main())
    assert results["late"] == ("request_timeout", 0)
    assert results["slow"][0] == "request_timeout" and 0 < results["slow"][1] < 240
    assert results["fine"] == ("done", 5)
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_watchdog_marks_a_stalled_loop_not_ready(engine):
    async def main():
        assert engine.ready
        stall = asyncio.create_task(engine._command(lambda: time.sleep(1.5)))  # the loop is stuck in here
        seen_stalled = False
        while not stall.done():
            seen_stalled |= (not engine.ready and engine.stalled)
            await asyncio.sleep(0.05)
        await stall
        return seen_stalled
    assert asyncio.run(main()) is True
    time.sleep(0.6)  # the loop turns again at least every 0.5 s
    assert engine.ready and not engine.stalled


def test_a_disconnect_frees_its_row_within_a_step(engine):
    steps = []
    engine.on_step = lambda rows, seconds: steps.append(rows)

    async def main():
        gens = [engine.submit(request(engine, f"d{i}", None, 240)) for i in range(3)]
        for g in gens:
            for _ in range(3):
                await g.__anext__()
        assert engine.stats().running == 3
        mark = len(steps)
        await gens[0].aclose()  # what the API does when the client goes away
        while engine.stats().running != 2:
            await asyncio.sleep(0.0005)
        after = steps[mark:]
        for g in gens[1:]:
            await g.aclose()
        return after
    try:
        after = asyncio.run(main())
    finally:
        engine.on_step = None
    # At most the step already under way ran with 3 rows; the next one has 2.
    assert len([n for n in after if n == 3]) <= 1, after


def test_stats_name_the_adapters_running_and_waiting(tiny_model_dir, tiny_store, tmp_path):
    """What loraplex_lora_requests_info reports: with one row a step, the adapter of the running
    request is running and the other's waits; a replaced version ("name~N") is reported by name."""
    cfg = load_config(overrides={"model.model": str(tiny_model_dir), "model.dtype": "float32",
                                 "engine.max_batch_size": 1})
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path / "cache")
    eng.start()

    async def main():
        await eng.wait_ready()
        await eng.load_adapter("alpha~3", tiny_store / "alpha")
        await eng.load_adapter("beta", tiny_store / "beta")
        gens = []
        for rid, adapter in (("a", "alpha~3"), ("b", "beta")):
            r = request(eng, rid, None, 100)
            gens.append(eng.submit(GenerationRequest(r.request_id, r.prompt_ids, r.params, adapter)))
        await gens[0].__anext__()
        first = asyncio.create_task(gens[1].__anext__())  # queued behind the one row
        deadline = time.monotonic() + 30
        while not eng.stats().waiting_adapters and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        st = eng.stats()
        first.cancel()
        try:
            await first
        except (asyncio.CancelledError, StopAsyncIteration):
            pass
        for g in gens:
            await g.aclose()
        return st
    try:
        st = asyncio.run(main())
    finally:
        eng.shutdown()
    assert st.running_adapters == {"alpha"} and st.waiting_adapters == {"beta"}, st

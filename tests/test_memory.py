"""Leases, LRU eviction and loads (server/memory.py), through the registry on a FakeEngine."""

import asyncio
import shutil

import pytest

from server.errors import InvalidRequest, NotReady, Overloaded
from tests.test_registry import four_adapter_store, make, run


@pytest.fixture
def store(store_copy):
    return four_adapter_store(store_copy)


def test_lru_eviction_and_reload(store):
    reg, eng = make(store, capacity=2)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("beta", "beta")
        reg.release(await reg.acquire("alpha"))          # alpha is now the most recently used
        await reg.register("gamma", "gamma")             # evicts beta
        assert set(eng.adapters) == {"alpha", "gamma"}
        assert not reg.get("beta").loaded and reg.get("beta") in reg.entries()  # still registered
        lease = await reg.acquire("beta")                # reloaded on demand; evicts alpha (LRU)
        assert lease.adapter == "beta" and set(eng.adapters) == {"gamma", "beta"}
        reg.release(lease)
    run(main())


def test_in_flight_adapters_are_never_evicted(store):
    reg, eng = make(store, capacity=2)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("beta", "beta")
        held = [await reg.acquire("alpha"), await reg.acquire("beta")]
        with pytest.raises(Overloaded) as e:
            await reg.register("gamma", "gamma")
        assert e.value.code == "adapter_capacity" and e.value.retry_after >= 1
        assert set(eng.adapters) == {"alpha", "beta"} and reg._visible("gamma") is None
        reg.release(held[1])
        await reg.register("gamma", "gamma")             # beta is idle now
        assert set(eng.adapters) == {"alpha", "gamma"}
        reg.release(held[0])
    run(main())


def test_per_request_mix(store):
    reg, eng = make(store)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("beta", "beta")
        lease = await reg.acquire("base-x", [("alpha", 0.5), ("beta", 0.5)])
        assert lease.adapter is None and lease.mix == (("alpha", 0.5), ("beta", 0.5))
        assert reg.get("alpha").inflight == 1 and reg.get("beta").inflight == 1
        assert [e.name for e in reg.entries()] == ["alpha", "beta"]             # a mix is not an entry
        assert not eng.blends and set(eng.adapters) == {"alpha", "beta"}      # nothing built, no slot taken
        reg.release(lease)
        assert reg.get("alpha").inflight == 0
        with pytest.raises(InvalidRequest):
            await reg.acquire("alpha", [("beta", 1.0)])                          # mixes sit on the base
        with pytest.raises(InvalidRequest):
            await reg.acquire("base-x", [("nope", 1.0)])
    run(main())


def test_a_request_waits_for_a_busy_slot_to_go_idle(store):
    reg, eng = make(store, capacity=1, slot_wait_s=5.0)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("beta", "beta")               # alpha evicted
        held = await reg.acquire("beta")
        waiter = asyncio.create_task(reg.acquire("alpha"))
        await asyncio.sleep(0.05)
        assert not waiter.done()                          # every slot serves: it waits, no 429
        reg.release(held)
        lease = await asyncio.wait_for(waiter, 2)
        assert lease.adapter == "alpha" and set(eng.adapters) == {"alpha"}
        reg.release(lease)
        held = await reg.acquire("alpha")
        reg.slot_wait_s = 0.05
        with pytest.raises(Overloaded):                   # and past the wait, 429 as before
            await reg.acquire("beta")
        reg.release(held)
    run(main())


def test_issue15_finding8_a_reload_serves_only_what_was_validated(store):
    reg, eng = make(store, capacity=1)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("beta", "beta")          # capacity 1: alpha is evicted
        assert "alpha" not in eng.adapters
        shutil.copy(store / "gamma" / "adapter_model.safetensors", store / "alpha" / "adapter_model.safetensors")
        with pytest.raises(NotReady) as e:
            await reg.acquire("alpha")
        assert e.value.code == "adapter_unavailable" and str(store) not in e.value.message  # no paths to clients
        assert "changed since it was registered" in reg.get("alpha").error
        assert "alpha" not in eng.adapters          # never served
        lease = await reg.acquire("beta")           # the others serve on
        reg.release(lease)
    run(main())
    again, _ = make(store)
    run(again.start())                              # and after a restart it is listed as failed
    assert "alpha" in again.failed and "changed since it was registered" in again.failed["alpha"][1]

"""The registry on a FakeEngine: names, paths, pins, drains, races, blends, persistence (leases: test_memory.py)."""

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from server.engine.fake import FakeEngine
from server.errors import Conflict, InvalidAdapter, InvalidRequest, NotFound, Overloaded
from server.lora.blend import BlendSpec
from server.registry import Registry, check_name


@pytest.fixture
def store(store_copy):
    return four_adapter_store(store_copy)


def four_adapter_store(s: Path) -> Path:
    """The tiny store (alpha r=4, beta r=2) plus gamma and delta (like alpha, other seeds)."""
    from tests.helpers import save_adapter
    base = Path(json.loads((s / "alpha" / "adapter_config.json").read_text())["base_model_name_or_path"])
    for name, seed in (("gamma", 5), ("delta", 6)):
        save_adapter(base, s / name, seed=seed)
    return s


def make(store, capacity=16, **kw):
    eng = FakeEngine("base-x")
    eng.start()
    return Registry(eng, store, capacity=capacity, **kw), eng


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("name", ["a", "my-adapter_1.2", "A" * 64, "0x"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "a/b", "a b", "A" * 65, "__base__", "a:b", "..", 5, "~mix-1"])
def test_bad_names(name):
    with pytest.raises(InvalidRequest):
        check_name(name)


def test_register_and_acquire(store):
    reg, eng = make(store)

    async def main():
        entry, created = await reg.register("alpha", "alpha")
        assert created and entry.loaded and entry.info.rank == 4
        assert (await reg.acquire("base-x")).adapter is None
        for model in ("alpha", "base-x:alpha"):
            lease = await reg.acquire(model)
            assert lease.adapter == "alpha" and entry.inflight == 1
            reg.release(lease)
            reg.release(lease)  # twice is harmless
            assert entry.inflight == 0
        assert entry.requests_total == 2
        for bad in ("beta", "base-x:beta", "other:alpha"):
            with pytest.raises(NotFound) as e:
                await reg.acquire(bad)
            assert e.value.code == "model_not_found"
    run(main())


def test_idempotent_conflict_and_replace(store):
    reg, eng = make(store)

    async def main():
        first, created = await reg.register("alpha", "alpha")
        again, created2 = await reg.register("alpha", "alpha")
        assert created and not created2 and again is first
        with pytest.raises(Conflict) as e:
            await reg.register("alpha", "beta")
        assert e.value.code == "adapter_exists"
        new, created3 = await reg.register("alpha", "beta", replace=True)
        assert created3 and new.info.rank == 2 and new.info.sha256 != first.info.sha256
        assert eng.loads == ["alpha", "alpha~1"]  # the new version loaded beside the old
        await asyncio.sleep(0)                    # the old version had no requests: it retires at once
        assert set(eng.adapters) == {"alpha~1"}
    run(main())


def test_issue15_finding4_a_failed_replace_leaves_the_old_version_serving(store, tmp_path):
    reg, eng = make(store)
    broken = store / "broken"
    shutil.copytree(store / "beta", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"truncated")

    async def main():
        first, _ = await reg.register("alpha", "alpha")
        with pytest.raises(InvalidAdapter):
            await reg.register("alpha", "broken", replace=True)
        lease = await reg.acquire("alpha")         # still served, the same version
        assert lease.adapter == "alpha" and reg.get("alpha") is first
        reg.release(lease)
        saved = json.loads((store / ".loraplex" / "state.json").read_text())
        assert "alpha" not in saved.get("removed", []) and "alpha" in [r["name"] for r in saved["adapters"]]
        assert set(eng.adapters) == {"alpha"}
    run(main())


def test_issue15_finding7_a_replace_never_makes_the_name_a_404_and_running_requests_finish_on_the_old(store):
    reg, eng = make(store)

    async def main():
        await reg.register("alpha", "alpha")
        running = await reg.acquire("alpha")        # a long request on the old version
        t0 = asyncio.get_running_loop().time()
        await reg.register("alpha", "beta", replace=True)
        assert asyncio.get_running_loop().time() - t0 < 1.0  # the admin call does not wait for it
        fresh = await reg.acquire("alpha")          # new requests: the new version, at once
        assert fresh.adapter == "alpha~1" and running.adapter == "alpha"
        assert {"alpha", "alpha~1"} <= set(eng.adapters)  # both in memory while the old one finishes
        reg.release(running)
        await asyncio.sleep(0.01)
        assert "alpha" not in eng.adapters and "alpha~1" in eng.adapters
        reg.release(fresh)
    run(main())


@pytest.mark.parametrize("path", ["../outside", "/etc", "alpha/../../x"])
def test_paths_outside_the_roots_refused(store, path):
    reg, _ = make(store)
    with pytest.raises(InvalidRequest) as e:
        run(reg.register("x", path))
    assert e.value.code == "path_outside_roots"


def test_symlink_escape_refused(store, tmp_path, tiny_store):
    outside = tmp_path / "outside"
    shutil.copytree(tiny_store / "alpha", outside)
    os.symlink(outside, store / "sneaky")
    reg, eng = make(store)
    with pytest.raises(InvalidRequest):
        run(reg.register("sneaky", "sneaky"))
    # An absolute path inside a configured extra root is allowed.
    reg2, _ = make(store, roots=[tmp_path / "outside"])
    assert run(reg2.register("outside", str(outside)))[1]


@pytest.mark.parametrize("breakage,code", [
    ("pickle", "pickle_refused"), ("no_config", "missing_config"), ("truncated", "invalid_weights"),
    ("rank", "rank_too_high")])
def test_refused_adapters_leave_no_trace(store, breakage, code):
    bad = store / "bad"
    shutil.copytree(store / "alpha", bad)
    if breakage == "pickle":
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04.")
    elif breakage == "no_config":
        (bad / "adapter_config.json").unlink()
    elif breakage == "truncated":
        w = bad / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    reg, eng = make(store)
    if breakage == "rank":
        eng.max_lora_rank = 2
    with pytest.raises(InvalidAdapter) as e:
        run(reg.register("bad", "bad"))
    assert e.value.code == code
    assert reg.entries() == [] and "bad" not in eng.adapters
    state = store / ".loraplex" / "state.json"
    saved = json.loads(state.read_text()) if state.exists() else {"adapters": []}
    assert saved["adapters"] == []


def test_pins(store):
    reg, eng = make(store, capacity=2)

    async def main():
        await reg.register("alpha", "alpha", pinned=True)
        await reg.register("beta", "beta")
        for name in ("gamma", "delta", "beta", "gamma"):   # churn: alpha stays
            if reg._visible(name) is None:
                await reg.register(name, name)
            reg.release(await reg.acquire(name))
            assert "alpha" in eng.adapters
        await reg.set_pinned("beta", True)
        with pytest.raises(Conflict) as e:
            await reg.set_pinned("gamma", True)
        assert e.value.code == "pin_capacity"
        await reg.set_pinned("alpha", False)
        await reg.set_pinned("gamma", True)
    run(main())


def test_unregister_waits_for_in_flight_requests(store):
    reg, eng = make(store)

    async def main():
        await reg.register("alpha", "alpha")
        leases = [await reg.acquire("alpha") for _ in range(8)]
        task = asyncio.create_task(reg.unregister("alpha"))
        await asyncio.sleep(0.01)
        with pytest.raises(NotFound):                     # hidden at once
            await reg.acquire("alpha")
        assert "alpha" in eng.adapters and not task.done()  # still serving the 8
        for lease in leases:
            reg.release(lease)
        await task
        assert "alpha" not in eng.adapters and reg.entries() == []
    run(main())


def test_racing_registers_of_one_name(store):
    reg, eng = make(store)

    async def main():
        same = await asyncio.gather(*(reg.register("x", "alpha") for _ in range(10)), return_exceptions=True)
        assert sum(1 for r in same if r[1]) == 1 and all(not isinstance(r, Exception) for r in same)
        other = await asyncio.gather(*(reg.register("y", p) for p in ["alpha", "beta"] * 5), return_exceptions=True)
        created = [r for r in other if not isinstance(r, Exception) and r[1]]
        assert len(created) == 1
        assert all(isinstance(r, Conflict) or not r[1] for r in other if r not in created)
        assert eng.loads.count("x") == 1 and eng.loads.count("y") == 1
    run(main())


def test_load_unload_churn_stays_consistent(store):
    reg, eng = make(store, capacity=2)
    names = ["alpha", "beta", "gamma", "delta"]

    async def user(i):
        for k in range(20):
            name = names[(i + k) % 4]
            try:
                lease = await reg.acquire(name)
            except (NotFound, Overloaded):
                continue
            assert lease.adapter in eng.adapters           # never routed to an adapter not in memory
            await asyncio.sleep(0)
            reg.release(lease)

    async def admin():
        for k in range(20):
            name = names[k % 4]
            try:
                if reg._visible(name):
                    await reg.unregister(name)
                else:
                    await reg.register(name, name)
            except (Overloaded, Conflict):
                pass

    async def main():
        for n in names[:2]:
            await reg.register(n, n)
        await asyncio.gather(admin(), *(user(i) for i in range(6)))
        loaded = {e.name for e in reg._entries.values() if e.loaded}
        assert loaded == set(eng.adapters) and len(loaded) <= 2
        assert all(e.inflight == 0 for e in reg._entries.values())
    run(main())


def test_blends(store):
    reg, eng = make(store)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("gamma", "gamma")
        await reg.register("beta", "beta")
        spec = BlendSpec((("alpha", 0.7), ("gamma", 0.3)), "linear")
        entry, created = await reg.create_blend("mixy", spec)
        assert created and entry.kind == "blend" and entry.loaded
        assert entry.path == (store / ".loraplex" / "blends" / "mixy").resolve()
        assert (await reg.create_blend("mixy", spec))[1] is False           # same recipe: idempotent
        saved, _ = await reg.create_blend("kept", spec, save=True)
        assert saved.path == (store / "kept").resolve() and (store / "kept" / "adapter_config.json").is_file()
        for bad_spec, code in [
            (BlendSpec((("alpha", 1.0), ("beta", 1.0)), "linear"), "rank_mismatch"),
            (BlendSpec((("alpha", 1.0), ("nope", 1.0)), "linear"), "unknown_adapter"),
            (BlendSpec((("alpha", float("nan")), ("gamma", 1.0)), "linear"), "invalid_blend"),
            (BlendSpec((("alpha", 1.0), ("gamma", 1.0)), "bogus"), "invalid_blend"),
            (BlendSpec((("alpha", 1.0), ("gamma", 1.0)), "ties"), "invalid_blend"),   # density missing
        ]:
            with pytest.raises(InvalidAdapter) as e:
                await reg.create_blend("bad", bad_spec)
            assert e.value.code == code
        assert (await reg.create_blend("cat", BlendSpec((("alpha", 1.0), ("beta", 1.0)), "cat")))[1]
        assert not list((store / ".loraplex").glob(".staging-*"))
    run(main())


def test_state_survives_restart(store):
    reg, eng = make(store, capacity=3)

    async def first():
        await reg.register("alpha", "alpha", pinned=True)
        await reg.register("gamma", "gamma")
        await reg.create_blend("b1", BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "linear"))
        return [(e.name, e.kind, e.pinned, e.created) for e in reg.entries()]
    before = run(first())
    # beta and delta sit in the store but were never registered: a restart with a
    # scan picks them up; unregistering one keeps it out.
    reg2, eng2 = make(store, capacity=3)
    run(reg2.start())
    names = [e.name for e in reg2.entries()]
    assert names[:3] == ["alpha", "gamma", "b1"] and set(names[3:]) == {"beta", "delta"}
    assert [(e.name, e.kind, e.pinned, e.created) for e in reg2.entries()][:3] == before
    assert eng2.loads[0] == "alpha"                        # pinned first

    async def drop():
        await reg2.unregister("delta")
    run(drop())
    reg3, _ = make(store, capacity=3)
    run(reg3.start())
    assert [e.name for e in reg3.entries()] == ["alpha", "gamma", "b1", "beta"]
    assert reg3.get("b1").recipe == BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "linear")


def test_corrupt_state_is_set_aside(store):
    home = store / ".loraplex"
    home.mkdir()
    (home / "state.json").write_text("{half a fil")
    (home / ".staging-x-1").mkdir()
    reg, _ = make(store)
    run(reg.start())
    assert {e.name for e in reg.entries()} == {"alpha", "beta", "gamma", "delta"}
    assert len(list(home.glob("state.json.corrupt-*"))) == 1
    assert json.loads((home / "state.json").read_text())["version"] == 1
    assert not (home / ".staging-x-1").exists()


def test_issue15_finding11_bad_store_folders_are_listed_as_failed_and_start_up_goes_on(store, tmp_path):
    for name, text in (("listy", "[]"), ("huge-r", '{"r": 1e400}'), ("deep", "[" * 100000 + "]" * 100000),
                       ("pissa", None)):
        shutil.copytree(store / "alpha", store / name)
        cfg = store / name / "adapter_config.json"
        cfg.write_text(text if text is not None else
                       json.dumps({**json.loads(cfg.read_text()), "init_lora_weights": "pissa"}))
    reg, _ = make(store)
    run(reg.start())
    names = {e.name for e in reg.entries()}
    assert {"alpha", "beta", "gamma", "delta"} <= names and not names & {"listy", "huge-r", "deep", "pissa"}
    assert set(reg.failed) == {"listy", "huge-r", "deep", "pissa"}
    assert "init_lora_weights" in reg.failed["pissa"][1]


def test_issue15_finding10_files_and_folders_that_lead_outside_the_roots_are_refused(store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(store / "alpha", outside)
    # A folder in the store whose weights file is a symlink to a file outside the roots.
    (store / "sneaky").mkdir()
    shutil.copy(store / "alpha" / "adapter_config.json", store / "sneaky")
    os.symlink(outside / "adapter_model.safetensors", store / "sneaky" / "adapter_model.safetensors")
    # A store folder that is a symlink to outside.
    os.symlink(outside, store / "linked")
    reg, _ = make(store)
    run(reg.start())
    assert {"sneaky", "linked"} <= set(reg.failed) and not {"sneaky", "linked"} & {e.name for e in reg.entries()}
    with pytest.raises(InvalidRequest) as e:
        run(reg.register("sneaky2", "sneaky"))
    assert e.value.code == "path_outside_roots"
    saved = json.loads((store / ".loraplex" / "state.json").read_text())
    assert saved["adapters"] and all("outside" not in json.dumps(r) for r in saved["adapters"])


def test_issue15_finding9_a_mix_after_a_replace_uses_the_new_version(store):
    reg, _ = make(store)

    async def main():
        await reg.register("alpha", "alpha")
        await reg.register("gamma", "gamma")
        before = await reg.acquire("base-x", [("alpha", 0.5), ("gamma", 0.5)])
        reg.release(before)
        await reg.register("alpha", "delta", replace=True)
        after = await reg.acquire("base-x", [("alpha", 0.5), ("gamma", 0.5)])
        assert before.mix == (("alpha", 0.5), ("gamma", 0.5)) and after.mix == (("alpha~1", 0.5), ("gamma", 0.5))
        reg.release(after)
    run(main())


def _snapshot(reg, eng, store):
    return ({e.name: (e.engine_key, e.pinned, e.loaded, e.info.sha256) for e in reg.entries()}, set(eng.adapters),
            sorted(p.name for p in store.iterdir()), (store / ".loraplex" / "state.json").read_text())


@pytest.mark.parametrize("op", ["register", "replace", "unregister", "pin", "unpin", "blend", "saved-blend"])
def test_issue15_finding5_a_failed_state_write_changes_nothing(store, op):
    from server.errors import StorageError

    reg, eng = make(store)

    async def main():
        await reg.start(scan_store=False)
        await reg.register("alpha", "alpha")
        await reg.register("gamma", "gamma", pinned=True)
        before = _snapshot(reg, eng, store)
        real = reg.state.write

        def broken(*a, **k):
            raise OSError(28, "No space left on device")
        reg.state.write = broken
        action = {"register": lambda: reg.register("beta", "beta"),
                  "replace": lambda: reg.register("alpha", "delta", replace=True),
                  "unregister": lambda: reg.unregister("alpha"),
                  "pin": lambda: reg.set_pinned("alpha", True),
                  "unpin": lambda: reg.set_pinned("gamma", False),
                  "blend": lambda: reg.create_blend("mix", BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "cat")),
                  "saved-blend": lambda: reg.create_blend("mix", BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "cat"),
                                                          save=True)}[op]
        with pytest.raises(StorageError) as e:
            await action()
        assert e.value.code == "storage_error"
        await asyncio.sleep(0.01)
        assert _snapshot(reg, eng, store) == before
        lease = await reg.acquire("alpha")  # and it still serves
        reg.release(lease)
        reg.state.write = real
    run(main())


def test_issue15_finding6_a_deleted_saved_blend_stays_deleted_after_a_restart(store):
    reg, eng = make(store)

    async def main():
        await reg.start()
        await reg.create_blend("keep", BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "cat"), save=True)
        assert (store / "keep").is_dir()
        await reg.unregister("keep")
    run(main())
    again, _ = make(store)
    run(again.start())
    assert "keep" not in {e.name for e in again.entries()}


@pytest.mark.parametrize("failure", ["read", "copy"])
@pytest.mark.parametrize("op", ["register", "replace", "blend", "reload"])
def test_issue15_a_failed_load_or_copy_changes_nothing(store, op, failure):
    """The other two steps of the all-or-nothing helper: the file read (InvalidAdapter) and the copy
    into memory (any error) fail in turn; everything is as it was. (Residency is a cache: a reload
    that must evict another adapter first may leave that one evicted; nothing else changes.)"""
    reg, eng = make(store, capacity=3 if op == "reload" else 4)

    async def main():
        await reg.start(scan_store=False)
        await reg.register("alpha", "alpha")
        await reg.register("gamma", "gamma")
        await reg.register("delta", "delta")
        if op == "reload":
            await reg.register("beta", "beta")   # capacity 3: alpha (least recently used) is evicted
        before = _snapshot(reg, eng, store)
        err = (InvalidAdapter("read failed", code="invalid_weights") if failure == "read"
               else RuntimeError("copy failed"))

        async def broken(*a, **k):
            raise err
        eng.load_adapter = broken
        eng.create_blend = broken
        action = {"register": lambda: reg.register("beta2", "beta"),
                  "replace": lambda: reg.register("gamma", "beta", replace=True),
                  "blend": lambda: reg.create_blend("mix", BlendSpec((("gamma", 0.5), ("delta", 0.5)), "cat")),
                  "reload": lambda: reg.acquire("alpha")}[op]
        with pytest.raises((InvalidAdapter, RuntimeError, Exception)):
            await action()
        after = _snapshot(reg, eng, store)
        if op == "reload":  # the only traces: the reason, for the admin API, and the eviction
            assert (reg.get("alpha").error is not None) == (failure == "read")
            strip = lambda snap: ({k: (v[0], v[1], v[3]) for k, v in snap[0].items()},) + snap[2:]  # noqa: E731
            before, after = strip(before), strip(after)
        assert after == before
    run(main())


@pytest.mark.parametrize("path", ["\x00", "alpha\x00/x", "a" * 5000])
def test_unresolvable_paths_are_400s_not_500s(store, path):
    """Found by the fuzzer (POST /v1/load_lora_adapter with lora_path "\\x00" answered 500)."""
    reg, _ = make(store)
    with pytest.raises(InvalidRequest) as e:
        run(reg.register("x", path))
    assert e.value.param == "path"


def test_redteam_the_base_models_id_is_not_an_adapter_name(store):
    """Registered under the base's id, an adapter was listed twice in /v1/models and unreachable
    (requests naming the id get the base). A register, a blend and a store folder are refused."""
    shutil.copytree(store / "alpha", store / "base-x")
    reg, eng = make(store)

    async def main():
        await reg.start()
        assert "base-x" not in {e.name for e in reg.entries()} and "base model's id" in reg.failed["base-x"][1]
        for call in (reg.register("base-x", "alpha"),
                     reg.create_blend("base-x", BlendSpec((("alpha", 1.0),), "cat"))):
            with pytest.raises(Conflict) as e:
                await call
            assert e.value.code == "name_is_base"
        assert (await reg.acquire("base-x")).adapter is None
    run(main())


@pytest.mark.parametrize("outcome", ["lands", "fails"])
@pytest.mark.parametrize("op", ["register", "replace", "unregister", "blend"])
def test_issue18_the_state_write_runs_off_the_event_loop_and_a_change_is_seen_only_after_it(store, op, outcome):
    """The fsyncs run on a worker thread: while one is held up the loop keeps serving, and the
    change is not visible yet (so a failing write needs to take nothing back from a request)."""
    import threading

    from server.errors import StorageError
    reg, eng = make(store)

    def served(model):
        try:
            return reg.resolve(model) and reg._entries[model].engine_key
        except NotFound:
            return None

    async def main():
        await reg.start(scan_store=False)
        await reg.register("alpha", "alpha")
        await reg.register("gamma", "gamma")
        real, gate, entered = reg.state.write, threading.Event(), threading.Event()

        def held(state):
            entered.set()
            assert gate.wait(10)
            if outcome == "fails":
                raise OSError(5, "Input/output error")
            real(state)
        reg.state.write = held
        name = {"register": "beta", "replace": "alpha", "unregister": "alpha", "blend": "mix"}[op]
        before = served(name)
        task = asyncio.create_task({
            "register": lambda: reg.register("beta", "beta"),
            "replace": lambda: reg.register("alpha", "delta", replace=True),
            "unregister": lambda: reg.unregister("alpha"),
            "blend": lambda: reg.create_blend("mix", BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "cat"))}[op]())
        while not entered.is_set():
            await asyncio.sleep(0.001)
        ticks = 0
        for _ in range(20):  # the loop is free while the write is held up
            await asyncio.sleep(0.001)
            ticks += 1
            assert served(name) == before and not task.done()
        lease = await reg.acquire("gamma")  # and requests are served meanwhile
        reg.release(lease)
        gate.set()
        if outcome == "fails":
            with pytest.raises(StorageError):
                await task
            assert served(name) == before
        else:
            await task
            assert served(name) == {"register": "beta", "replace": "alpha~1", "unregister": None, "blend": "mix"}[op]
        assert ticks == 20
        reg.state.write = real
        saved = json.loads((store / ".loraplex" / "state.json").read_text())
        assert (name in {r["name"] for r in saved["adapters"]}) == (served(name) is not None)
    run(main())

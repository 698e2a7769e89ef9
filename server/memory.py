"""The registry's memory: leases on adapters, the engine's LoRA slots, LRU eviction, loads.

Owns: what a request holds while it runs (`acquire` a lease on its adapter, or on the sources
of a per-request mix; `release` it when done) and which entries are in the engine's memory:
at most `reg.capacity` (adapters.max_loaded_adapters); loading past it evicts the least
recently used entry that is unpinned and idle (`make_room`); with every slot serving a request
waits up to `slot_wait_s` for one to go idle, then gets 429. An entry with leases out is never
evicted; an evicted entry stays registered and is reloaded (`load`) on its next request, checked
to be the content that was validated when it was registered.

Concurrency is the registry's (registry.py): everything runs on the event loop's thread, so a
check and the update after it, with no `await` between, are one step; `load` and `make_room`
are called with `reg._lock` held, which keeps two of them from deciding about the same free slot.
It knows entries and the engine's protocol, not names, aliases, the state file or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from . import versions
from .entries import Allowed, Entry, Lease
from .errors import InvalidAdapter, InvalidRequest, NotFound, NotReady, Overloaded
from .lora.blend import BlendSpec, check_blendable, check_spec

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("loraplex.registry")


async def acquire(reg: Registry, model: str, mix: list[tuple[str, float]] | None = None,
                  allowed: Allowed | None = None, seed: str = "") -> Lease:
    """Lease the adapter a request names (loading it if evicted). Release with `release`.
    The lease holds one version for the whole request: a replace or an alias flip after this
    line sends new requests elsewhere and lets this one finish on what it got."""
    try:
        e = reg.lookup(model, allowed, seed)
    except NotFound:
        if not await versions.resolve_unknown(reg, model, allowed):
            raise
        e = reg.lookup(model, allowed, seed)  # registered now, like a cold load
    if mix:
        if e is not None:
            raise InvalidRequest("`adapters` blends on top of the base model: set `model` to the base id "
                                 f"{reg.base_id!r}", param="adapters")
        return await _acquire_mix(reg, mix, allowed)
    if e is None:
        return Lease(None)
    lease = Lease(e.engine_key, name=e.name, version=e.version)
    try:
        await take(reg, e, lease)
    except BaseException:
        release(reg, lease)
        raise
    return lease


async def take(reg: Registry, e: Entry, lease: Lease, *, request: bool = True) -> None:
    """Hold `e` for the lease (loading it if evicted). `request`: count it as a client request."""
    # Count the lease first, with no await before it: from here on `e` cannot be evicted.
    e.inflight += 1
    e.idle.clear()
    e.requests_total += request
    reg._touch(e)
    lease.entries.append(e)
    if not e.loaded:
        async with reg._lock:
            if not e.loaded:
                try:
                    await load(reg, e, wait=reg.slot_wait_s if request else 0.0)
                except InvalidAdapter as err:
                    # Its files changed or broke on disk after it was validated: the reason is for
                    # the admin API (it holds paths); the client learns only that it is unavailable.
                    e.error = err.message
                    raise NotReady(f"adapter {e.name!r} is unavailable: its files on disk changed or broke "
                                   "since it was registered; an admin must replace it",
                                   code="adapter_unavailable") from None


def release(reg: Registry, lease: Lease) -> None:
    if lease.released:
        return
    lease.released = True
    for e in lease.entries:
        e.inflight -= 1
        if e.inflight == 0:
            e.idle.set()
            reg._went_idle.set()


async def _acquire_mix(reg: Registry, mix: list[tuple[str, float]], allowed: Allowed | None) -> Lease:
    spec = BlendSpec(tuple(mix), "cat")
    usable = [e for e in reg.entries() if allowed is None or allowed(e.name)]  # others are "unknown"
    try:
        check_spec(spec, {e.name: e.info.rank for e in usable})
        check_blendable(spec, {e.name: e.info.variants for e in usable}, "a per-request mix")
    except InvalidAdapter as e:
        raise InvalidRequest(e.message, param="adapters", code=e.code) from None
    # The engine names each source by its current version: a source replaced later is not mixed.
    lease = Lease(None, mix=tuple((reg._entries[src].engine_key, w) for src, w in spec.adapters))
    try:
        for src, _ in spec.adapters:  # sources stay in memory while the request runs
            await take(reg, reg._entries[src], lease)
    except BaseException:
        release(reg, lease)
        raise
    return lease


def loaded_count(reg: Registry) -> int:
    """Engine slots in use: loaded entries, and replaced versions still finishing requests."""
    return sum(1 for e in slotted(reg) if e.loaded) + len(reg._retiring)


def slotted(reg: Registry) -> list[Entry]:
    """Entries that may hold a slot and be evicted: registered ones and versions kept for aliases."""
    return [*reg._entries.values(), *reg._held.values()]


async def make_room(reg: Registry, wait: float = 0.0) -> None:
    """Evict LRU idle unpinned entries until one more fits. Call with reg._lock held.
    With every slot serving, wait up to `wait` seconds for one to go idle, then 429."""
    deadline = time.monotonic() + wait
    while loaded_count(reg) >= reg.capacity:
        idle = [e for e in slotted(reg) if e.loaded and not e.pinned and e.inflight == 0]
        if not idle and time.monotonic() < deadline:
            reg._went_idle.clear()
            try:
                await asyncio.wait_for(reg._went_idle.wait(), deadline - time.monotonic())
            except TimeoutError:
                pass
            continue
        if not idle:
            busy = sum(1 for e in reg._entries.values() if e.loaded and e.inflight)
            pinned = sum(1 for e in reg._entries.values() if e.loaded and e.pinned)
            reg.observer.adapter_loaded("overloaded")
            raise Overloaded(f"all {reg.capacity} adapter slots (adapters.max_loaded_adapters) are taken: "
                             f"{busy} serving requests, {pinned} pinned; retry later", retry_after=1,
                             code="adapter_capacity")
        victim = min(idle, key=lambda e: e.use_seq)
        # Mark it gone before awaiting the engine: a request that arrives meanwhile must
        # see it unloaded and queue for a reload, not be routed to weights being freed.
        victim.loaded = False
        await reg.engine.unload_adapter(victim.engine_key)
        reg.observer.adapter_evicted()
        log.info("evicted %s (least recently used)", victim.name)


async def load(reg: Registry, e: Entry, wait: float = 0.0) -> None:
    """Into the engine's memory, making room first. Call with reg._lock held."""
    await make_room(reg, wait)
    t0 = time.perf_counter()
    assert e.path is not None, "a mix is never loaded; its sources are"
    try:
        info = await reg.engine.load_adapter(e.engine_key, e.path, check_rank=e.kind == "adapter")
    except InvalidAdapter:
        reg.observer.adapter_loaded("invalid")
        raise
    if e.info.sha256 and info.sha256 != e.info.sha256:  # what is served is what was validated
        await reg.engine.unload_adapter(e.engine_key)
        reg.observer.adapter_loaded("invalid")
        raise InvalidAdapter(f"adapter {e.name!r}: its files in {e.path} changed since it was registered "
                             f"(sha256 {e.info.sha256[:12]} then, {info.sha256[:12]} now); register it again "
                             "with replace to serve the new content", code="content_changed")
    e.info, e.error = info, None
    reg.observer.adapter_loaded("ok", time.perf_counter() - t0)
    e.loaded, e.loaded_at = True, time.time()
    reg._seq += 1
    e.use_seq = max(e.use_seq, reg._seq)  # just loaded counts as just used
    log.info("loaded %s into memory in %.0f ms", e.name, 1000 * (time.perf_counter() - t0))

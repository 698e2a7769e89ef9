"""Adapter lifecycle: names, pins, replacements, unregistering, persistence.

Owns: which adapters and blends exist (`Entry`, in entries.py), and the rules around them:
- requests hold leases; at most `max_loaded_adapters` entries are in the engine's memory, the
  least recently used idle unpinned one evicted to make room, a request finding every slot busy
  waiting up to `slot_wait_s` and then getting 429 (an admin load gets 429 at once): leases,
  eviction and loads are memory.py's; an evicted entry stays registered;
- unregistering hides the name at once (new requests get 404), waits for the
  leases out on it, then frees it;
- a replace loads the new version beside the old and swaps; the old one finishes its leases, or
  stays (reachable as NAME@VERSION) while an alias names it; what a `model` string names and the
  alias operations are versions.py's, building a blend is blends.py's;
- the registered set, pins, blends, aliases and kept versions are saved to a state file after
  each change, written before the change is visible: a new adapter, a replacement's swap, a blend,
  an alias flip or an unregister takes effect only once the file says so, so a failed write (503)
  undoes nothing a request saw.

Concurrency: all state here is touched only on the event loop's thread, so a
check and the update that follows it, with no `await` between, are one atomic
step (SGLang's lora_registry makes acquire atomic the same way). `_lock`
serialises the operations that await the engine (load, evict, unload, blend) and every
admin change with its state write, so two of them never interleave their decisions about
memory or their snapshots of the state. The write itself runs on a worker thread
(`StateFile.save`): requests keep streaming through it.

Where files may come from is roots.py's. It knows the engine only through its protocol,
and nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import blends, memory, versions
from .aliases import Alias
from .engine.protocol import Engine
from .entries import Allowed, Entry, Lease, NullObserver, Observer, check_name
from .errors import Conflict, InvalidAdapter, NotFound, StorageError
from .lora.blend import BlendSpec
from .lora.weights import AdapterInfo, content_hash
from .resolvers import Resolvers
from .restore import restore
from .roots import Roots
from .state import Record, State, StateFile

log = logging.getLogger("loraplex.registry")


class Registry:
    def __init__(self, engine: Engine, store: Path, *, capacity: int = 16, roots: list[Path] | None = None,
                 observer: Observer | None = None, slot_wait_s: float = 0.0, resolvers: Resolvers | None = None,
                 resolve_store: bool = False):
        self.engine = engine
        self.observer: Observer = observer or NullObserver()
        self.store = Path(store)
        self.capacity = capacity
        self._roots = Roots(self.store, roots or [])
        self.state = StateFile(self.store)
        self._entries: dict[str, Entry] = {}
        self._removed: set[str] = set()
        # Folders found at start-up that could not be served: name -> (folder, reason), for the
        # admin API. One bad folder is reported, never fatal.
        self.failed: dict[str, tuple[str, str]] = {}
        self._retiring: set[Entry] = set()   # replaced versions, unloaded once their requests finish
        # Replaced versions an alias still names ("name@version" -> entry): kept, reachable only
        # as NAME@VERSION, until no alias (rollback included) refers to them.
        self._held: dict[str, Entry] = {}
        self.aliases: dict[str, Alias] = {}
        # An unknown name: a store folder that appeared (resolve_store), then the sources.
        self.resolvers = resolvers
        self.resolve_store = resolve_store
        self._resolving: dict[str, asyncio.Task] = {}  # one fetch per name, however many ask
        self._versions = 0                   # replacements made: the N of "name~N"
        self._tasks: set[asyncio.Task] = set()  # retirements in flight (held: the loop keeps weak refs)
        self._lock = asyncio.Lock()
        self._seq = 0
        self.slot_wait_s = slot_wait_s
        self._went_idle = asyncio.Event()  # set whenever a loaded entry's last lease is released

    def _touch(self, e: Entry) -> None:
        self._seq += 1
        e.use_seq = self._seq
        e.last_used_at = time.time()

    @property
    def base_id(self) -> str:
        return self.engine.model_id

    # -- names and paths ---------------------------------------------------------
    def resolve_path(self, path: str | Path) -> Path:
        return self._roots.resolve_path(path)

    def resolve_folder(self, path: str | Path) -> Path:
        return self._roots.resolve_folder(path)

    def _visible(self, name: str) -> Entry | None:
        e = self._entries.get(name)
        return e if e is not None and not e.draining and not e.pending else None

    def get(self, name: str) -> Entry:
        e = self._visible(name)
        if e is None:
            raise NotFound(f"adapter {name!r} is not registered", param="name", code="adapter_not_found")
        return e

    def entries(self) -> list[Entry]:
        return [e for e in self._entries.values() if not e.draining and not e.pending]

    def counts(self) -> dict[str, int]:
        """For the metrics: registered (adapters and blends), in memory, pinned, blends."""
        listed = self.entries()
        return {"registered": len(listed), "loaded": memory.loaded_count(self),
                "pinned": sum(e.pinned for e in listed), "blends": sum(e.kind == "blend" for e in listed)}

    # -- names, versions and aliases (versions.py) ------------------------------------
    def resolve(self, model: str, allowed: Allowed | None = None, seed: str = "") -> str | None:
        """The adapter or blend a request's `model` names (None for the base); NotFound otherwise."""
        e = self.lookup(model, allowed, seed)
        return None if e is None else e.name

    def lookup(self, model: str, allowed: Allowed | None = None, seed: str = "") -> Entry | None:
        return versions.lookup(self, model, allowed, seed)

    def alias_json(self, name: str) -> dict[str, Any]:
        return versions.alias_json(self, name)

    async def set_alias(self, name: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        return await versions.set_alias(self, name, body)

    async def rollback_alias(self, name: str) -> dict[str, Any]:
        return await versions.rollback_alias(self, name)

    async def delete_alias(self, name: str) -> None:
        await versions.delete_alias(self, name)

    async def create_blend(self, name: str, spec: BlendSpec, *, save: bool = False) -> tuple[Entry, bool]:
        return await blends.create_blend(self, name, spec, save=save)

    # -- leases and memory (memory.py) -------------------------------------------------
    async def acquire(self, model: str, mix: list[tuple[str, float]] | None = None,
                      allowed: Allowed | None = None, seed: str = "") -> Lease:
        """Lease the adapter (or a mix's sources) a request names; give it back with `release`."""
        return await memory.acquire(self, model, mix, allowed, seed)

    def release(self, lease: Lease) -> None:
        memory.release(self, lease)

    # -- admin operations ----------------------------------------------------------
    async def register(self, name: str, path: str | Path, *, pinned: bool = False,
                       replace: bool = False) -> tuple[Entry, bool]:
        """Register and load an adapter folder. Returns (entry, created)."""
        check_name(name, base_id=self.base_id)
        versions.check_not_alias(self, name)
        folder = self.resolve_folder(path)
        existing = self._entries.get(name)
        # Only a name already taken needs the hash now (is it the same content?); a new one gets
        # its sha256 from the load, which hashes the bytes it reads: one pass over the files.
        sha = await asyncio.to_thread(content_hash, folder) if existing is not None else ""
        if existing is not None and existing.draining:
            raise Conflict(f"adapter {name!r} is being unloaded; retry shortly", code="adapter_draining")
        if existing is not None and existing.pending:  # a racing register holds the lock until it settles
            async with self._lock:
                pass
            return await self.register(name, path, pinned=pinned, replace=replace)
        if existing is not None:
            if existing.kind == "adapter" and sha and existing.info.sha256 == sha and existing.path == folder:
                if pinned and not existing.pinned:
                    await self.set_pinned(name, True)
                return existing, False
            if not replace:
                raise Conflict(f"adapter {name!r} is already registered with other content "
                               "(pass \"replace\": true to swap it)", param="name", code="adapter_exists")
            return await self._replace(existing, folder, pinned), True
        async with self._lock:
            if name in self._entries:  # a racing call registered it while we waited
                raise Conflict(f"adapter {name!r} was registered concurrently", param="name", code="adapter_exists")
            if pinned:
                self._check_pin_room()
            entry = Entry(name, "adapter", folder, AdapterInfo(folder, 0, 0.0, (), sha, 0), pinned=pinned,
                          pending=True)
            self._entries[name] = entry  # reserved, not yet visible: a concurrent register of the name gets 409
            try:
                await memory.load(self, entry)
            except BaseException:
                del self._entries[name]  # a failed load leaves no trace
                raise

            def commit() -> None:
                entry.pending = False    # visible from here on
                self._removed.discard(name)
            try:
                await self._save(add=entry, revive=name, commit=commit)
            except BaseException:  # all or nothing: nobody saw it; out of memory again
                del self._entries[name]
                entry.loaded = False
                await self.engine.unload_adapter(entry.engine_key)
                raise
            self.failed.pop(name, None)
        log.info("registered %s from %s (rank %d, %s)", name, folder, entry.info.rank,
                 ",".join(entry.info.target_modules))
        return entry, True

    async def _replace(self, old: Entry, folder: Path, pinned: bool) -> Entry:
        """Load the new version beside the old, then swap: new requests get the new one at once,
        running ones finish on the old, which is unloaded after them. A failure anywhere before the
        swap leaves the old version serving, untouched."""
        async with self._lock:
            if self._entries.get(old.name) is not old or old.draining:
                raise Conflict(f"adapter {old.name!r} changed while it was being replaced; retry",
                               param="name", code="adapter_exists")
            self._versions += 1
            new = Entry(old.name, "adapter", folder, AdapterInfo(folder, 0, 0.0, (), "", 0),
                        pinned=pinned or old.pinned, created=old.created, engine_key=f"{old.name}~{self._versions}")
            await memory.load(self, new)  # raises: nothing changed

            keep = versions.referenced(self, f"{old.name}@{old.version}")  # an alias names this version

            def swap() -> None:
                self._entries[old.name] = new  # one assignment: the swap
                if keep:
                    self._held[f"{old.name}@{old.version}"] = old
                elif old.loaded:
                    self._retiring.add(old)
            try:
                await self._save(add=new, hold=old if keep else None, commit=swap)
            except BaseException:  # the old version never stopped serving
                await self.engine.unload_adapter(new.engine_key)
                raise
        if old in self._retiring:
            self._spawn_retire(old)
        log.info("replaced %s with %s (the old version finishes its %d requests)", old.name, folder, old.inflight)
        return new

    def _spawn_retire(self, old: Entry) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, old: Entry) -> None:
        await old.idle.wait()
        async with self._lock:
            if old in self._retiring:
                self._retiring.discard(old)
                old.loaded = False
                await self.engine.unload_adapter(old.engine_key)

    async def unregister(self, name: str) -> Entry:
        self.get(name)  # 404 at once, without waiting for the lock
        async with self._lock:
            e = self.get(name)  # again: a racing unregister or replace may have changed it meanwhile
            versions.check_no_alias_uses(self, name)
            # A folder directly in the store (an adapter, or a blend saved there) is remembered as
            # removed, so the next start does not register it again.
            in_store = e.path is not None and e.path.parent == self.store.resolve()

            def hide() -> None:
                e.draining = True  # new requests get 404 from here on
                if in_store:
                    self._removed.add(name)
            # Written before anything is undone: a failure here changes nothing.
            await self._save(drop=name, forget=name if in_store else None, commit=hide)
        await e.idle.wait()  # leases out finish normally
        async with self._lock:
            if e.loaded:
                await self.engine.unload_adapter(e.engine_key)
                e.loaded = False
            if self._entries.get(name) is e:  # not a version registered under the name since
                del self._entries[name]
            if e.kind == "blend" and e.path is not None and self.state.blends in e.path.parents:
                shutil.rmtree(e.path, ignore_errors=True)
            try:
                await self._save()
            except StorageError as err:  # the state on disk already says it is gone
                log.warning("unregistered %s; the state write after it failed: %s", name, err.message)
        self.observer.adapter_forgotten(name)
        log.info("unregistered %s", name)
        return e

    def _check_pin_room(self, extra: int = 1) -> None:
        pinned = sum(1 for e in self._entries.values() if e.pinned and not e.draining)
        if pinned + extra > self.capacity:
            raise Conflict(f"cannot pin: {pinned} adapters are pinned and adapters.max_loaded_adapters is "
                           f"{self.capacity}; unpin one first", param="pinned", code="pin_capacity")

    async def set_pinned(self, name: str, pinned: bool) -> Entry:
        self.get(name)
        async with self._lock:
            e = self.get(name)
            was = e.pinned
            if pinned and not was:
                self._check_pin_room()
            # A pin is no tenant's business (it only keeps the adapter in memory), so it is set
            # before the write, which snapshots it, and undone if the write fails.
            e.pinned = pinned
            try:
                if pinned and not e.loaded:
                    await memory.load(self, e)
                await self._save()
            except BaseException:
                e.pinned = was  # a pin's load that succeeded stays: in memory, unpinned, as before
                raise
        return e

    # -- start-up and persistence ----------------------------------------------------
    async def _save(self, *, add: Entry | None = None, drop: str | None = None, revive: str | None = None,
                    forget: str | None = None, hold: Entry | None = None, aliases: dict[str, Alias] | None = None,
                    release: frozenset[str] | set[str] = frozenset(),
                    commit: Callable[[], None] | None = None) -> None:
        """Write the state file as it will be after a change: the visible entries, plus `add` (not
        yet visible, or replacing its name's entry), minus `drop`; `revive`/`forget` take a name off
        or onto the removed list; `hold` is a replaced version an alias keeps, `release` the kept
        versions let go, `aliases` the new alias table. `commit` makes the change visible once the
        file holds it. StorageError (503) when it cannot be written: then nothing was committed."""
        def record(e: Entry, name: str) -> Record:
            assert e.path is not None
            return Record(name, e.kind, self.state.rel(e.path), e.pinned, e.info.sha256,
                          e.recipe.recipe() if e.recipe else None, e.created)

        def build() -> State:
            listed = {e.name: e for e in self._entries.values() if not e.draining and not e.pending}
            if add is not None:
                listed[add.name] = add
            listed.pop(drop or "", None)
            records = [record(e, e.name) for e in listed.values() if e.path is not None]
            removed = (self._removed - {revive or ""}) | ({forget} if forget else set())
            held = {k: e for k, e in self._held.items() if k not in release}
            if hold is not None:
                held[f"{hold.name}@{hold.version}"] = hold
            table = self.aliases if aliases is None else aliases
            return State(records, sorted(removed), {k: a.to_json() for k, a in table.items()},
                         [record(e, k) for k, e in held.items() if e.path is not None])
        try:
            await self.state.save(build, commit)
        except OSError as e:
            raise StorageError(f"the registry's state file could not be written ({e.strerror or e}); the change "
                               "was not made", code="storage_error") from None

    async def start(self, scan_store: bool = True) -> list[str]:
        """Restore the saved state, add new store folders, fill memory (pinned first)."""
        restored = restore(self.state, self._roots, base_id=self.base_id, scan_store=scan_store)
        self._removed = restored.removed
        self.failed.update(restored.failed)
        self._entries.update((e.name, e) for e in restored.entries)
        self._held.update((f"{e.name}@{e.version}", e) for e in restored.held)
        self.aliases.update(restored.aliases)
        order = sorted(self._entries.values(), key=lambda e: not e.pinned)
        loaded = []
        async with self._lock:
            for e in order:
                if memory.loaded_count(self) >= self.capacity:
                    break
                try:
                    await memory.load(self, e)
                    loaded.append(e.name)
                except InvalidAdapter as err:
                    log.warning("skipping adapter %s: %s", e.name, err.message)
                    self.failed[e.name] = (str(e.path), err.message)
                    del self._entries[e.name]
        await self._save()
        return loaded

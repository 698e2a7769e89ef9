"""Store watching (`adapters.watch = true`): folders added, changed or removed in the store are
registered, replaced or unregistered within seconds, without a restart.

Owns: the polling loop and its rule for when a folder has settled. Every `watch_interval_s` it
reads each store folder's two files' size and modification time (a stat each, no hashing); a
folder acts only once two scans in a row saw the same signature, so a copy in progress is never
loaded half-written. Then: a new folder is registered, a changed one is registered with
`replace` (the registry hashes it: same content is a no-op; new content loads beside the old and
swaps, running requests finish on the old weights), a vanished one is unregistered. Failures are
logged and listed in the admin API's `failed`, never fatal.

Polling rather than inotify: it works the same on network and container-mounted folders, where
file events are not delivered, and costs two stats per folder per interval.

It knows the registry only through its public operations, and nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .entries import NAME_RE
from .errors import LoraplexError

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("loraplex.watch")

FILES = ("adapter_config.json", "adapter_model.safetensors")
Signature = tuple[tuple[int, int], ...]


def scan(store: Path) -> dict[str, Signature]:
    """Each adapter folder of the store and its files' (size, mtime_ns)."""
    out: dict[str, Signature] = {}
    if not store.is_dir():
        return out
    for folder in store.iterdir():
        if folder.name.startswith(".") or not NAME_RE.match(folder.name) or not folder.is_dir():
            continue
        try:
            stats = [(folder / f).stat() for f in FILES]
        except OSError:
            continue  # not (yet) an adapter folder
        out[folder.name] = tuple((s.st_size, s.st_mtime_ns) for s in stats)
    return out


class StoreWatcher:
    def __init__(self, registry: Registry, interval_s: float):
        self.registry = registry
        self.interval_s = interval_s
        self._known: dict[str, Signature] = {}    # what the registry was last brought in line with
        self._seen: dict[str, Signature] = {}     # the previous scan: a folder acts once it matches

    async def run(self) -> None:
        self._known = self._seen = await asyncio.to_thread(scan, self.registry.store)
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except Exception:  # one bad scan must not end the watch
                log.exception("store watch: a scan failed")

    async def step(self) -> None:
        now = await asyncio.to_thread(scan, self.registry.store)
        settled = {n: sig for n, sig in now.items() if self._seen.get(n) == sig}
        self._seen = now
        for name, sig in sorted(settled.items()):
            if self._known.get(name) != sig:
                await self._apply(name, replace=name in self._known)
                self._known[name] = sig
        for name in sorted(set(self._known) - set(now)):
            del self._known[name]
            await self._remove(name)

    async def _apply(self, name: str, *, replace: bool) -> None:
        reg = self.registry
        try:
            entry = next((e for e in reg.entries() if e.name == name), None)
            if entry is not None and entry.path != (reg.store / name).resolve():
                return  # a name registered from elsewhere: the store folder does not own it
            await reg.register(name, name, replace=replace or entry is not None)
            log.info("store watch: %s %s", "replaced" if replace else "registered", name)
        except LoraplexError as e:
            log.warning("store watch: %s refused: %s", name, e.message)
            reg.failed[name] = (str(reg.store / name), e.message)

    async def _remove(self, name: str) -> None:
        reg = self.registry
        entry = next((e for e in reg.entries() if e.name == name), None)
        if entry is None or entry.path != (reg.store / name).resolve():
            return
        try:
            await reg.unregister(name)
            log.info("store watch: unregistered %s (its folder was removed)", name)
        except LoraplexError as e:
            log.warning("store watch: %s's folder was removed but it stays registered: %s", name, e.message)

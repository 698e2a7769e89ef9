"""Named blends: the registry's operation that builds one from registered adapters.

Owns: `create_blend`, which the registry delegates here: it checks the recipe (PEFT's rules and
which adapter variants may be blended), holds the sources while the engine builds the blend with
PEFT's `add_weighted_adapter`, publishes its folder by rename, and makes it visible only once the
state file holds it. On any failure: no entry, no slot, no folder.

The lifecycle it relies on is the registry's (`_lock`, `_save`: registry.py) and its memory's
(`take`, `make_room`, `release`: memory.py); the blend math is server/lora/blend.py's and the engine's.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from typing import TYPE_CHECKING

from . import memory
from .atomic import publish
from .entries import Entry, Lease, check_name
from .errors import Conflict
from .lora.blend import BlendSpec, check_blendable, check_spec
from .versions import check_not_alias

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("loraplex.registry")


async def create_blend(reg: Registry, name: str, spec: BlendSpec, *, save: bool = False) -> tuple[Entry, bool]:
    check_name(name, base_id=reg.base_id)
    check_not_alias(reg, name)
    existing = reg._visible(name)
    if existing is not None:
        if existing.kind == "blend" and existing.recipe == spec:
            return existing, False
        raise Conflict(f"{name!r} is already registered", param="name", code="adapter_exists")
    check_spec(spec, {e.name: e.info.rank for e in reg.entries()})
    check_blendable(spec, {e.name: e.info.variants for e in reg.entries()})
    target = reg.store / name if save else reg.state.blends / name
    if target.exists():
        raise Conflict(f"{target} already exists", param="name", code="folder_exists")
    lease = Lease(None)
    try:
        for src, _ in spec.adapters:
            await memory.take(reg, reg._entries[src], lease, request=False)
        async with reg._lock:
            if name in reg._entries:
                raise Conflict(f"{name!r} was registered concurrently", param="name", code="adapter_exists")
            await memory.make_room(reg)
            staging = reg.state.staging(name)
            try:
                # The engine knows each source by its current version's name.
                engine_spec = dataclasses.replace(spec, adapters=tuple(
                    (reg._entries[src].engine_key, w) for src, w in spec.adapters))
                info = await reg.engine.create_blend(name, engine_spec, staging)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    publish(staging, target, replace=False)  # the folder appears whole or not at all
                except BaseException:
                    await reg.engine.unload_adapter(name)
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            entry = Entry(name, "blend", target.resolve(), dataclasses.replace(info, folder=target.resolve()),
                          loaded=True, loaded_at=time.time(), recipe=spec)
            try:
                await reg._save(add=entry, commit=lambda: reg._entries.__setitem__(name, entry))
            except BaseException:  # all or nothing: no entry, no slot, no folder
                await reg.engine.unload_adapter(entry.engine_key)
                shutil.rmtree(target, ignore_errors=True)
                raise
    finally:
        memory.release(reg, lease)
    reg.observer.blend_created()
    log.info("blend %s = %s of %s", name, spec.combination_type, spec.adapters)
    return entry, True

"""The registry's alias operations, and the old versions kept because an alias names them.

Owns: what a `model` string names (`lookup`: the base, NAME, NAME@VERSION, BASE:ADAPTER or an
alias, within an API key's scope), and the alias operations the registry delegates here: set,
roll back and delete an alias, keeping or letting go of replaced versions. A replaced version stays in memory
reachable as `NAME@VERSION` while any alias (its rollback target included) names it; once none
does, it retires like any replaced version: when its last request finishes.

Every operation is all-or-nothing and atomic for requests: it checks everything, writes the state
file with the new table, and only then swaps the table in (one assignment, no await between the
write and the swap), so a request sees the old alias or the new one, never a half-made change, and
a failed write leaves the old one serving. A request that has its lease keeps its version.

The state and lifecycle rules it relies on (`_lock`, `_save`, `_entries`, `_held`, `_retiring`)
are the registry's (registry.py).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

from .aliases import Alias, parse_targets, split_version
from .atomic import publish
from .entries import NAME_RE, Allowed, Entry, check_name
from .errors import Conflict, InvalidAdapter, NotFound, NotReady

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("loraplex.registry")


def lookup(reg: Registry, model: str, allowed: Allowed | None = None, seed: str = "") -> Entry | None:
    """The entry a `model` names: the base (None), NAME (its current version), NAME@VERSION (that
    version, current or kept for an alias), BASE:ADAPTER, or an alias (its target for `seed`).
    `allowed` (the API key's scope): a name outside it is answered as a name nobody serves."""
    base = reg.base_id
    name = None if model == base else model[len(base) + 1:] if model.startswith(base + ":") else model
    e: Entry | None = None
    if name is not None and name in reg.aliases:
        if allowed is None or allowed(name):  # an alias is judged by its own name
            e = version_of(reg, reg.aliases[name].pick(name, seed))
            if e is None:
                raise NotReady(f"alias {name!r} points at a version that is no longer available; an admin "
                               "must flip it", code="alias_target_unavailable")
            return e
    elif name is not None:
        e = version_of(reg, name)
        if e is not None and allowed is not None and not allowed(e.name):
            e = None
    if (name is None and (allowed is None or allowed(base))) or e is not None:
        return e
    known = sum(1 for x in reg.entries() if allowed is None or allowed(x.name))
    raise NotFound(f"The model {model!r} does not exist (known: the base {base!r} and "
                   f"{known} adapters; see GET /v1/models)", param="model", code="model_not_found")


def version_of(reg: Registry, model: str) -> Entry | None:
    name, version = split_version(model)
    e = reg._visible(name)
    if not version or (e is not None and e.version == version):
        return e
    return reg._held.get(model)


def referenced(reg: Registry, model: str, table: dict[str, Alias] | None = None) -> bool:
    return any(model in a.references() for a in (reg.aliases if table is None else table).values())


def check_no_alias_uses(reg: Registry, name: str) -> None:
    users = sorted(a for a, al in reg.aliases.items() if any(split_version(m)[0] == name
                                                               for m in al.references()))
    if users:
        raise Conflict(f"adapter {name!r} is a target of alias(es) {users} (or of their rollback); "
                       "flip or delete them first", param="name", code="adapter_in_use_by_alias")


def check_not_alias(reg: Registry, name: str) -> None:
    if name in reg.aliases:
        raise Conflict(f"{name!r} is an alias; choose another name or delete the alias", param="name",
                       code="name_is_alias")


def alias_json(reg: Registry, name: str) -> dict[str, Any]:
    a = reg.aliases.get(name)
    if a is None:
        raise NotFound(f"alias {name!r} does not exist", param="alias", code="alias_not_found")
    targets = [{"model": m, "weight": w, "version": (e.version if (e := version_of(reg, m)) else None)}
               for m, w in a.targets]
    return {"alias": name, "targets": targets, **({"previous": a.to_json()["previous"]} if a.previous else {})}


async def set_alias(reg: Registry, name: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Point `name` at the body's target(s); the previous targets are kept for rollback.
    Returns (alias json, created)."""
    check_name(name, param="alias", base_id=reg.base_id)
    targets = parse_targets(body)
    async with reg._lock:
        if reg._visible(name) is not None or name in reg._entries:
            raise Conflict(f"{name!r} is an adapter's name; an alias needs a name of its own", param="alias",
                           code="name_is_adapter")
        # Each target must name a servable version now: NAME@VERSION pins the version it names.
        for m, _ in targets:
            _target(reg, m)
        old = reg.aliases.get(name)
        if old is not None and old.targets == targets:
            return alias_json(reg, name), False
        await _commit_table(reg, {**reg.aliases, name: Alias(targets, old.targets if old else None)})
    log.info("alias %s -> %s", name, ", ".join(f"{m} ({w:.3f})" for m, w in targets))
    return alias_json(reg, name), old is None


async def rollback_alias(reg: Registry, name: str) -> dict[str, Any]:
    async with reg._lock:
        a = reg.aliases.get(name)
        if a is None:
            raise NotFound(f"alias {name!r} does not exist", param="alias", code="alias_not_found")
        if a.previous is None:
            raise Conflict(f"alias {name!r} has no previous target to roll back to", param="alias",
                           code="no_previous_target")
        for m, _ in a.previous:
            _target(reg, m)
        await _commit_table(reg, {**reg.aliases, name: Alias(a.previous, a.targets)})
    log.info("alias %s rolled back", name)
    return alias_json(reg, name)


async def delete_alias(reg: Registry, name: str) -> None:
    async with reg._lock:
        if name not in reg.aliases:
            raise NotFound(f"alias {name!r} does not exist", param="alias", code="alias_not_found")
        await _commit_table(reg, {k: v for k, v in reg.aliases.items() if k != name})
    log.info("alias %s deleted", name)


def _target(reg: Registry, model: str) -> Entry:
    name, version = split_version(model)
    e = version_of(reg, model)
    if e is None:
        if version and reg._visible(name) is not None:
            raise NotFound(f"{name!r} has no version {version!r} in memory (its current version is "
                           f"{reg._visible(name).version!r})", param="target",  # type: ignore[union-attr]
                           code="version_not_found")
        raise NotFound(f"alias target {model!r} is not a registered adapter or blend", param="target",
                       code="model_not_found")
    return e


async def _commit_table(reg: Registry, table: dict[str, Alias]) -> None:
    """Write the state with `table`, then swap it in and let go of versions no alias names now.
    Call with _lock held."""
    dropped = [k for k in reg._held if not referenced(reg, k, table)]

    def commit() -> None:
        reg.aliases = table  # one assignment: every request after it sees the new table
        for key in dropped:
            old = reg._held.pop(key)
            if old.loaded:
                reg._retiring.add(old)
                reg._spawn_retire(old)

    await reg._save(aliases=table, release=set(dropped), commit=commit)


async def resolve_unknown(reg: Registry, model: str, allowed: Allowed | None) -> bool:
    """Try to make an unknown `model` servable: a store folder that appeared since start-up, then
    the resolvers' sources (server/resolvers.py). True when it is registered now. Concurrent
    requests for one name share one fetch; a name unregistered on purpose is not brought back."""
    base = reg.base_id
    name = model[len(base) + 1:] if model.startswith(base + ":") else model
    if (not NAME_RE.match(name) or name in reg.aliases or name in reg._removed or name == base
            or (allowed is not None and not allowed(name))):
        return False
    task = reg._resolving.get(name)
    if task is None:
        task = asyncio.get_running_loop().create_task(_fetch_and_register(reg, name))
        reg._resolving[name] = task
        task.add_done_callback(lambda _t: reg._resolving.pop(name, None))
    return await asyncio.shield(task)  # a client leaving does not cancel the others' load


async def _fetch_and_register(reg: Registry, name: str) -> bool:
    folder = reg.store / name
    if (folder / "adapter_config.json").is_file():
        if not reg.resolve_store:
            return False
        await reg.register(name, name)
        return True
    if reg.resolvers is None or not reg.resolvers.sources or reg.resolvers.known_missing(name) or folder.exists():
        return False
    staging = reg.state.staging(name)
    try:
        src = await asyncio.to_thread(reg.resolvers.fetch, name, staging)
        if src is None:
            return False
        publish(staging, folder, replace=False)  # the folder appears whole or not at all
    except FileExistsError:
        pass  # an admin or a watcher put it there meanwhile: register what is there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        await reg.register(name, name)
    except InvalidAdapter:
        shutil.rmtree(folder, ignore_errors=True)  # refused as any load: leave no folder to retry on
        raise
    log.info("registered %s from %s in %.0f ms after the fetch", name, src, 1000 * (time.perf_counter() - t0))
    return True

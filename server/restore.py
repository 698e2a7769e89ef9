"""Start-up: the entries the saved state and the store folder describe, checked before any loads.

Owns: merging the state file's records with the store's folders (a folder not in the state and
not removed on purpose is a new adapter), and checking each as files: its name, that it lies
inside the roots, its config, and that its content is what was registered (sha256). What fails is
reported with its reason, never fatal: one bad folder must not stop the server.

It does not load anything into the engine (the registry does, pinned first) and knows nothing
of HTTP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .aliases import Alias, split_version
from .entries import NAME_RE, Entry, check_name
from .errors import Conflict, InvalidAdapter, InvalidRequest
from .lora.blend import BlendSpec
from .lora.weights import describe_adapter
from .roots import Roots
from .state import Record, StateFile

log = logging.getLogger("loraplex.registry")


@dataclass
class Restored:
    entries: list[Entry] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)          # store folders unregistered on purpose
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (folder, reason)
    held: list[Entry] = field(default_factory=list)       # replaced versions an alias names
    aliases: dict[str, Alias] = field(default_factory=dict)


def restore(state: StateFile, roots: Roots, *, base_id: str, scan_store: bool = True) -> Restored:
    state.clean_staging()
    saved = state.read()
    records = saved.records if saved else []
    out = Restored(removed=set(saved.removed) if saved else set())
    known = {r.name for r in records}
    if scan_store and state.store.is_dir():
        for folder in sorted(p for p in state.store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name in known or folder.name in out.removed or not NAME_RE.match(folder.name):
                continue
            if (folder / "adapter_config.json").is_file():
                records.append(Record(folder.name, "adapter", folder.name))
    held = [(r, split_version(r.name)) for r in (saved.held if saved else [])]
    for r, (name, version) in [(r, (r.name, "")) for r in records] + held:
        folder = state.abs(r.path)
        try:
            check_name(name, base_id=base_id)  # a store folder named like the base: listed as failed
            inside = roots.resolve_folder(folder)  # a folder or a file leading outside the roots: refused
            info = describe_adapter(inside)
            if (r.sha256 or version) and info.sha256 != r.sha256:
                raise InvalidAdapter(f"its files changed since it was registered (sha256 {r.sha256[:12]} "
                                     f"then, {info.sha256[:12]} now); register it again to serve them",
                                     code="content_changed")
        except (InvalidAdapter, InvalidRequest, Conflict) as refused:
            log.warning("skipping %s: %s", r.name, refused.message)
            out.failed[r.name] = (str(folder), refused.message)
            continue
        # A kept version is known to the engine by its own key, beside the current version's.
        e = Entry(name, r.kind, folder.resolve(), info, pinned=r.pinned and not version,
                  recipe=BlendSpec.from_recipe(r.recipe) if r.recipe else None, created=r.created or int(time.time()),
                  engine_key=f"{name}~{version}" if version else "")
        (out.held if version else out.entries).append(e)
    for alias, raw in (saved.aliases if saved else {}).items():
        try:
            out.aliases[alias] = Alias.from_json(raw)
        except (KeyError, TypeError, ValueError) as bad:
            log.warning("skipping alias %s: its saved form is broken (%s)", alias, bad)
    return out

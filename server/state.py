"""The registry's state file: which adapters and blends are registered, and their pins.

Owns: the file's format, writing it atomically (temporary file, fsync, rename,
fsync of the folder: a crash leaves the old file or the new one, never half of
one) on a worker thread so that the fsyncs never stall the event loop (and every
stream with it), and reading it back, where a corrupt file is set aside under a dated
name and reported, never a reason to fail start-up. It also owns the hidden
folders beside it (`.loraplex/` in the store) and clears staging leftovers.

It knows nothing of the engine or of HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import staging_path, write_file

log = logging.getLogger("loraplex.state")

VERSION = 1


@dataclass
class Record:
    name: str
    kind: str                       # "adapter" | "blend"
    path: str                       # folder, relative to the store when inside it
    pinned: bool = False
    sha256: str = ""
    recipe: dict[str, Any] | None = None  # blends: {"adapters": [...], "combination_type", "density"}
    created: int = 0                # registration time (unix seconds)


@dataclass
class State:
    records: list[Record] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # store folders unregistered on purpose
    aliases: dict[str, Any] = field(default_factory=dict)  # alias -> Alias.to_json()
    held: list[Record] = field(default_factory=list)  # replaced versions an alias names ("name@version")


class StateFile:
    def __init__(self, store: Path):
        self.store = Path(store)
        self.home = self.store / ".loraplex"
        self.path = self.home / "state.json"
        self.blends = self.home / "blends"
        # Serialises `save`: the race it prevents is an older snapshot's write landing after a
        # newer one's, or a snapshot being taken while a change that may yet fail is half applied.
        self._lock = asyncio.Lock()

    def staging(self, name: str) -> Path:
        """A staging folder on the same file system as its target, so rename is atomic."""
        self.home.mkdir(parents=True, exist_ok=True)
        return staging_path(self.home, name)

    def clean_staging(self) -> None:
        for parent in (self.home, self.store):
            if parent.is_dir():
                for p in parent.glob(".staging-*"):   # folders, and files (the state file's)
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def read(self) -> State | None:
        """The saved state; None when there is none or it was corrupt (then set aside)."""
        if not self.path.is_file():
            return None
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("version") != VERSION:
                raise ValueError(f"unknown version {raw.get('version')!r}")
            records = [Record(**r) for r in raw["adapters"]]
            removed = [str(n) for n in raw.get("removed", [])]
            aliases = dict(raw.get("aliases", {}))
            held = [Record(**r) for r in raw.get("held", [])]
            return State(records, removed, aliases, held)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            aside = self.path.with_name(f"state.json.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            log.error("state file %s is corrupt (%s); set aside as %s, starting from the store", self.path, e, aside)
            return None

    async def save(self, build: Callable[[], State], commit: Callable[[], None] | None = None) -> None:
        """Write `build()`'s state off the event loop, then run `commit()` (the caller's change made
        visible), with no await between the write and the commit. OSError when it cannot be written:
        then `commit` is not run. Each snapshot is built after the previous write and its commit, so
        the file always holds the latest committed state."""
        async with self._lock:
            state = build()
            await asyncio.to_thread(self.write, state)
            if commit is not None:
                commit()

    def write(self, state: State) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = {"version": VERSION, "adapters": [vars(r) for r in state.records],  # flat: no deep copy
                "removed": sorted(set(state.removed)), "aliases": state.aliases, "held": [vars(r) for r in state.held]}
        # One line, no indent: json then runs its C encoder (indent falls back to Python, 4x slower),
        # and the thread holds the GIL, which the loop waits for, for less time.
        write_file(self.path, json.dumps(data).encode())

    def rel(self, folder: Path) -> str:
        folder = Path(folder).resolve()
        root = self.store.resolve()
        return str(folder.relative_to(root)) if folder == root or root in folder.parents else str(folder)

    def abs(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.store / p

"""Adapter names: which exist, where they live, and what a `model` field means.

Owns: the name rules, the adapter store on disk (one PEFT folder per adapter),
confining adapter paths to the store, registering adapters with the engine,
and resolving a request's `model` (the base id, an adapter name, or
`BASE_ID:ADAPTER`) to an adapter name or None for the base.

It knows the engine only through the protocol (`load_adapter`), and nothing
of HTTP. Admin operations (unload, pins, LRU, blends, persistence) grow here
with the registry issue.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidAdapter, InvalidRequest, NotFound
from .lora.weights import AdapterInfo
from .engine.protocol import Engine

log = logging.getLogger("loraplex.registry")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    kind: str                       # "adapter" or "blend"
    info: AdapterInfo
    loaded_at: float


def check_name(name: str, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param=param, code="invalid_name")
    return name


class Registry:
    def __init__(self, engine: Engine, store: Path):
        self.engine = engine
        self.store = Path(store)
        self._entries: dict[str, AdapterEntry] = {}
        # Serialises loads so two calls for one name cannot both reach the engine.
        self._lock = asyncio.Lock()

    @property
    def base_id(self) -> str:
        return self.engine.model_id

    def resolve_path(self, path: str | Path) -> Path:
        """A path relative to the store, or absolute inside it; never outside (after symlinks)."""
        root = self.store.resolve()
        p = Path(path)
        full = (p if p.is_absolute() else root / p).resolve()
        if full != root and root not in full.parents:
            raise InvalidRequest(f"adapter path {str(path)!r} resolves outside the adapter store {root}",
                                 param="path", code="path_outside_store")
        return full

    async def load(self, name: str, path: str | Path) -> AdapterEntry:
        check_name(name)
        folder = self.resolve_path(path)
        async with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                return entry
            info = await self.engine.load_adapter(name, folder)
            entry = AdapterEntry(name, "adapter", info, time.time())
            self._entries[name] = entry
            log.info("adapter %s loaded from %s (rank %d, %s)", name, info.folder, info.rank,
                     ",".join(info.target_modules))
            return entry

    async def load_store(self) -> list[str]:
        """Register every adapter folder in the store; a bad one is logged and skipped."""
        if not self.store.is_dir():
            log.info("adapter store %s does not exist; no adapters loaded", self.store)
            return []
        loaded = []
        for folder in sorted(p for p in self.store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / "adapter_config.json").is_file():
                continue
            try:
                await self.load(folder.name, folder.name)
                loaded.append(folder.name)
            except (InvalidAdapter, InvalidRequest) as e:
                log.warning("skipping adapter folder %s: %s", folder, e.message)
        return loaded

    def resolve(self, model: str) -> str | None:
        """Map a request's `model` to an adapter name, or None for the base model."""
        base = self.base_id
        if model == base:
            return None
        name = model[len(base) + 1:] if model.startswith(base + ":") else model
        if name in self._entries:
            return name
        raise NotFound(f"The model {model!r} does not exist (known: the base {base!r} and "
                       f"{len(self._entries)} adapters; see GET /v1/models)", param="model", code="model_not_found")

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.loaded_at)

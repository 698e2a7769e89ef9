"""What the registry holds about each adapter, and what a request holds while it runs.

Owns: `Entry` (one registered adapter or blend: its files, its version's engine name, its
residency and use), `Lease` (the entries a request holds and the engine names it uses),
`Observer` (what the registry reports to the metrics) and the adapter-name rule (`check_name`).
Plain data: the rules that change them are the registry's (`registry.py`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import Conflict, InvalidRequest
from .lora.blend import BlendSpec
from .lora.weights import AdapterInfo

Allowed = Callable[[str], bool]  # an API key's scope (server/scopes.py): may this key use the name?

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(eq=False)
class Entry:
    name: str
    kind: str                       # "adapter" | "blend"
    path: Path | None               # weights on disk; None for a mix
    info: AdapterInfo
    pinned: bool = False
    loaded: bool = False            # in the engine's memory now
    loaded_at: float | None = None
    last_used_at: float | None = None
    requests_total: int = 0
    inflight: int = 0
    draining: bool = False          # being unregistered: hidden, waiting for leases
    pending: bool = False           # being registered: hidden until the state file holds it
    recipe: BlendSpec | None = None
    created: int = field(default_factory=lambda: int(time.time()))  # registration time, kept across restarts
    use_seq: int = 0                # LRU order: a counter, not a clock, so that ties cannot happen
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None        # why its last reload failed (its files changed or broke on disk)
    # The name the engine knows it by: the name itself, "name~N" for the N-th replacement (so the
    # new version is loaded beside the old and the two never share a slot name), or "name~VERSION"
    # for a replaced version an alias kept, restored at start-up.
    engine_key: str = ""

    def __post_init__(self):
        self.idle.set()
        self.engine_key = self.engine_key or self.name

    @property
    def version(self) -> str:
        """The immutable id of this content: its sha256's first 12 hex digits (`NAME@VERSION`)."""
        return self.info.sha256[:12]


@dataclass
class Lease:
    """What a request holds while it runs; `adapter` is the engine name (None = base). A
    per-request mix holds its sources and names them with their weights in `mix` (the engine
    adds each source's delta times its weight to the row: no blend is built, no slot taken)."""

    adapter: str | None
    entries: list[Entry] = field(default_factory=list)
    released: bool = False
    mix: tuple[tuple[str, float], ...] = ()   # (engine name, weight) per source
    name: str | None = None                    # the adapter's public name (metrics, logs)
    version: str = ""                          # the version it serves (metrics, responses)


class Observer(Protocol):
    """What the registry reports (the app's `Metrics` implement it)."""

    def adapter_loaded(self, result: str, seconds: float | None = None) -> None: ...

    def adapter_evicted(self) -> None: ...

    def blend_created(self) -> None: ...

    def adapter_forgotten(self, name: str) -> None: ...


class NullObserver:
    """The registry's observer when nobody watches: ignores it all."""

    def adapter_loaded(self, result: str, seconds: float | None = None) -> None:
        pass

    def adapter_evicted(self) -> None:
        pass

    def blend_created(self) -> None:
        pass

    def adapter_forgotten(self, name: str) -> None:
        pass


def check_name(name: object, param: str = "name", base_id: str = "") -> str:
    """The name, if an adapter may have it; with `base_id`, the base model's id is taken (requests
    naming it get the base: an adapter there would be unreachable)."""
    if base_id and name == base_id:
        raise Conflict(f"{name!r} is the base model's id; choose another adapter name", param=param,
                       code="name_is_base")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
            param=param, code="invalid_name")
    return name

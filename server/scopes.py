"""Which adapters an API key may use: `[server] api_keys` entries of the form `KEY: PATTERN ...`.

Owns: parsing a key entry into the bare key and its scope, and the scope's test of a name
(shell globs, `fnmatchcase`: `support-*`, `tenant-?`, `exact-name`). A key with no `:` may
use everything. A scoped key may use the base model only when a pattern matches the base's id,
a blend or alias only by its own name, `NAME@VERSION` as NAME, and `BASE:ADAPTER` as ADAPTER.
It does not know routes or the registry: the API passes `Scope.allows` to the registry, which
answers a name outside the scope exactly as a name nobody serves (404, so names do not leak).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import ConfigError

# What a pattern may hold: the characters of adapter names plus the glob's own `*?[]!`.
_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!/-]{1,256}$")


@dataclass(frozen=True)
class Scope:
    patterns: tuple[str, ...]

    def allows(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.patterns)


def parse_key(entry: str, where: str) -> tuple[str, Scope | None]:
    """`"KEY"` -> (KEY, None); `"KEY: a-* b"` -> (KEY, Scope(("a-*", "b"))). Patterns are separated
    by spaces only: a comma separates keys (the environment's list), so "k: a, b" would make `b` a
    key of its own; a pattern holding a comma is refused, and so is a bare key that holds a glob."""
    key, colon, rest = entry.partition(":")
    key = key.strip()
    if not key:
        raise ConfigError(f"{where}: an entry has no key before ':'")
    if not colon:
        if any(c in key for c in "*?[]"):
            raise ConfigError(f"{where}: a key holds a glob character: is it an adapter pattern split off by "
                              "a comma? Separate a key's patterns with spaces")
        return key, None
    patterns = tuple(rest.split())
    if not patterns:
        raise ConfigError(f"{where}: an entry has ':' but names no adapter pattern after it "
                          "(drop the ':' to let its key use every adapter)")
    for p in patterns:
        if not _PATTERN.match(p):
            raise ConfigError(f"{where}: adapter pattern {p!r} holds characters no adapter name has "
                              "(separate patterns with spaces, not commas)")
    return key, Scope(patterns)

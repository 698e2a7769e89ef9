"""Aliases: a stable name that points at adapter versions, flipped atomically, split for canaries.

Owns: `Alias` (its weighted targets, each `NAME` for the current version or `NAME@VERSION` for a
pinned one, and the previous targets kept for rollback), checking an alias body, the seeded
choice of a weighted alias's target, and the alias table's persisted form.

The choice is reproducible: a request's seed (its `user`, else its request id) hashed with the
alias name gives a point in [0, 1), and the targets' cumulative weights decide. The same user
always lands on the same side of a canary, and a 10 % target gets 10 % of seeds.

It knows nothing of leases, the engine or HTTP: the registry resolves the targets, keeps the
versions they name in memory, and makes a flip visible only once the state file holds it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest

Targets = tuple[tuple[str, float], ...]   # (NAME or NAME@VERSION, weight); weights sum to 1


@dataclass(frozen=True)
class Alias:
    targets: Targets
    previous: Targets | None = None

    def pick(self, alias: str, seed: str) -> str:
        """The target for this seed: the same seed always gets the same target."""
        if len(self.targets) == 1:
            return self.targets[0][0]
        digest = hashlib.sha256(f"{alias}\0{seed}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        acc = 0.0
        for model, weight in self.targets:
            acc += weight
            if point < acc:
                return model
        return self.targets[-1][0]  # rounding: the cumulative sum can end a hair under 1

    def references(self) -> set[str]:
        """Every model string this alias may send to, rollback included (those versions are kept)."""
        return {m for m, _ in self.targets} | {m for m, _ in self.previous or ()}

    def to_json(self) -> dict[str, Any]:
        def enc(t: Targets) -> list[dict[str, Any]]:
            return [{"model": m, "weight": w} for m, w in t]
        return {"targets": enc(self.targets), "previous": enc(self.previous) if self.previous else None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Alias:
        def dec(t: Any) -> Targets:
            return tuple((str(x["model"]), float(x["weight"])) for x in t)
        return cls(dec(raw["targets"]), dec(raw["previous"]) if raw.get("previous") else None)


def parse_targets(body: dict[str, Any]) -> Targets:
    """`{"target": "a@v1"}` or `{"targets": [{"model": "a@v1", "weight": 0.9}, ...]}` -> normalised
    targets. 400 naming the field for anything else."""
    if ("target" in body) == ("targets" in body):
        raise InvalidRequest('give exactly one of "target" (a model) or "targets" (a list of {model, weight})',
                             param="target")
    if "target" in body:
        if not isinstance(body["target"], str) or not body["target"]:
            raise InvalidRequest('"target" must be a model name: NAME or NAME@VERSION', param="target")
        return ((body["target"], 1.0),)
    raw = body["targets"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= 16:
        raise InvalidRequest('"targets" must be a list of 1 to 16 {model, weight} objects', param="targets")
    out: list[tuple[str, float]] = []
    for t in raw:
        if not isinstance(t, dict) or set(t) != {"model", "weight"} or not isinstance(t["model"], str) \
                or isinstance(t["weight"], bool) or not isinstance(t["weight"], (int, float)):
            raise InvalidRequest('each of "targets" is {"model": NAME or NAME@VERSION, "weight": a number}',
                                 param="targets")
        if not (math.isfinite(t["weight"]) and t["weight"] > 0):
            raise InvalidRequest(f"target weights must be positive finite numbers, got {t['weight']!r}",
                                 param="targets")
        out.append((t["model"], float(t["weight"])))
    if len({m for m, _ in out}) != len(out):
        raise InvalidRequest("a model is named twice in the targets", param="targets")
    total = sum(w for _, w in out)
    return tuple((m, w / total) for m, w in out)


def split_version(model: str) -> tuple[str, str]:
    """"a@1f2e3d4c5b6a" -> ("a", "1f2e3d4c5b6a"); "a" -> ("a", "")."""
    name, _, version = model.partition("@")
    return name, version

"""Promotion gates: `--promote-if "eval_loss<0.8*base"`, parsed without eval() and checked against a card.

Owns: the gate grammar, `METRIC OP [FACTOR*]REFERENCE` where
  METRIC     eval_loss | exact_match   (on the run's held-out split)
  OP         <  <=  >  >=
  REFERENCE  base (the same metric for the base model on the same split) or a number
(for example `eval_loss<0.8*base`, `eval_loss<=1.5`, `exact_match>=0.9`, `exact_match>base`),
and `check`, which says whether a finished run's numbers pass and, either way, why, with the
numbers. A run with no held-out split cannot be gated (an error before training starts).

It does not train, evaluate or register: trainer.py computes the numbers and decides where the
adapter goes, the CLI and the job runner register only what passed.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

METRICS = ("eval_loss", "exact_match")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
GATE_RE = re.compile(r"^\s*(?P<metric>[a-z_]+)\s*(?P<op><=|>=|<|>)\s*(?:(?P<factor>\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?"
                     r"(?P<ref>base|\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)\s*$")


class GateError(ValueError):
    """The gate does not parse; the message shows the grammar."""


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    factor: float
    reference: str | float   # "base" or a number

    def needs_exact_match(self) -> bool:
        return self.metric == "exact_match"


def parse(text: str) -> Gate:
    m = GATE_RE.match(text or "")
    if m is None or m["metric"] not in METRICS or (m["factor"] and m["ref"] != "base"):
        raise GateError(f"cannot read the gate {text!r}: expected METRIC OP [FACTOR*]base or METRIC OP NUMBER with "
                        f"METRIC one of {', '.join(METRICS)} and OP one of {' '.join(OPS)} "
                        "(e.g. eval_loss<0.8*base, exact_match>=0.9)")
    ref: str | float = "base" if m["ref"] == "base" else float(m["ref"])
    return Gate(text.strip(), m["metric"], m["op"], float(m["factor"] or 1.0), ref)


def check(gate: Gate, adapter: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """{"gate", "passed", "value", "threshold", "reason"} for the adapter's and the base's metrics."""
    value = adapter.get(gate.metric)
    ref = base.get(gate.metric) if gate.reference == "base" else gate.reference
    if value is None or ref is None:
        return {"gate": gate.text, "passed": False, "value": value, "threshold": None,
                "reason": f"{gate.metric} was not measured (no held-out examples it applies to)"}
    threshold = gate.factor * float(ref)
    passed = bool(OPS[gate.op](float(value), threshold))
    about = f"{gate.factor:g} x base {gate.metric} {float(ref):.4f} = " if gate.reference == "base" else ""
    verdict = "holds" if passed else "does not hold"
    return {"gate": gate.text, "passed": passed, "value": float(value), "threshold": threshold,
            "reason": f"{gate.text} {verdict}: {gate.metric} {float(value):.4f} vs {about}{threshold:.4f}"}

"""Structured outputs: constraints compiled with xgrammar, enforced as a token mask per row.

Owns: `Structured` (what a request constrains its output to: a JSON schema, any JSON object, a
regular expression, one of a list of strings, or an EBNF grammar), `Grammars` (the compiler for one
tokenizer's vocabulary: a constraint the engine cannot compile is an InvalidRequest naming the
problem; xgrammar caches each compiled grammar by its text, so a schema is compiled once), and
`apply_masks`, which the sampler calls: each constrained row's allowed tokens as a bitmask, applied
in place to that row's logits, so rows with and without constraints share one batch.

Why xgrammar: measured on this project's default model (49,152 tokens) on a 2-core Zen 3, it filled
a JSON-schema mask in 15-23 us per token against llguidance's 75-190 us, and applied 16 rows' masks
in 52 us (loadtest/RESULTS.md, "Grammar engines"). A matcher is one request's state in its grammar;
the engine thread advances it with each sampled token (`accept`), so it follows preemption and
recompute, which keep the output tokens.

JSON schemas compile without free whitespace between tokens by default (xgrammar's `any_whitespace`
off: separators ", " and ": "), so a model cannot spend its token budget on blank space;
vLLM's `disable_any_whitespace: false` turns it back on. It knows nothing of requests or HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidRequest

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Structured:
    kind: str                       # one of KINDS
    value: str = ""                 # the schema's JSON text, the regex, the grammar, or the choices as a JSON list
    any_whitespace: bool = False    # JSON only: allow free whitespace between tokens
    param: str = "response_format"  # the request field it came from, for error messages


def _xgr() -> Any:
    import xgrammar  # imported on first use: importing it costs a second

    return xgrammar


class Grammars:
    """The compiler for one vocabulary. `compile` is thread-safe (xgrammar's own locking)."""

    def __init__(self, info: Any):
        self.info = info
        self.vocab_size = int(info.vocab_size)
        self._compiler = _xgr().GrammarCompiler(info, cache_enabled=True)

    @classmethod
    def from_tokenizer(cls, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Grammars:
        xgr = _xgr()
        return cls(xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=list(stop_token_ids)))

    @classmethod
    def from_raw_vocab(cls, vocab: list[bytes], stop_token_ids: Sequence[int]) -> Grammars:
        xgr = _xgr()
        return cls(xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=list(stop_token_ids)))

    def compile(self, s: Structured) -> Any:
        """The compiled grammar; InvalidRequest (naming s.param) for one that does not compile."""
        c = self._compiler
        try:
            if s.kind == "json_schema":
                return c.compile_json_schema(s.value, any_whitespace=s.any_whitespace, strict_mode=True)
            if s.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=s.any_whitespace,
                                             strict_mode=False)
            if s.kind == "regex":
                return c.compile_regex(s.value)
            if s.kind == "choice":
                choices = json.loads(s.value)
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(x, ensure_ascii=False) for x in choices))
            if s.kind == "grammar":
                return c.compile_grammar(s.value)
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequest(f"{s.param}: the {s.kind.replace('_', ' ')} does not compile: {_first_line(e)}",
                                 param=s.param, code="invalid_grammar") from None
        raise InvalidRequest(f"{s.param}: unknown constraint kind {s.kind!r}", param=s.param)

    def matcher(self, compiled: Any) -> Any:
        return _xgr().GrammarMatcher(compiled)


def _first_line(e: BaseException) -> str:
    """xgrammar's messages start with a C++ source location; the reason follows it."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def apply_masks(logits: torch.Tensor, matchers: list[Any | None]) -> None:
    """Mask, in place, each constrained row's logits to the tokens its grammar allows next.

    logits: (B, V) float, one row per entry of `matchers` (None = unconstrained). Columns past the
    grammar's vocabulary (a model's padded embedding) are never allowed for a constrained row.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    xgr = _xgr()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab,
                                    indices=rows)



class LazyGrammars:
    """`Grammars` built on first use (reading a 49k-token vocabulary takes half a second), once:
    the lock keeps two first requests from building it twice."""

    def __init__(self, build: Callable[[], Grammars]):
        self._build = build
        self._lock = threading.Lock()
        self.grammars: Grammars | None = None

    def compile(self, s: Structured) -> Any:
        with self._lock:
            if self.grammars is None:
                self.grammars = self._build()
        return self.grammars.compile(s)

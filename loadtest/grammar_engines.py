"""xgrammar against llguidance on this project's default model: the measurement that chose xgrammar.

    pip install llguidance   # beside the project's xgrammar, only for this comparison
    python -m loadtest.grammar_engines [--rounds 3]

For one JSON schema it times, per engine: the tokenizer set-up, compiling the schema, filling the
next-token mask and advancing the matcher per token along a valid answer (the first walk, then
warm walks on fresh matchers), and applying 16 rows' masks to a (16, vocab) logits tensor.
Rounds alternate between the two engines; every round is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}},
                                           "kind": {"enum": ["a", "b", "c"]}},
          "required": ["name", "age", "tags", "kind"], "additionalProperties": False}
ANSWER = json.dumps({"name": "Ann Lee", "age": 42, "tags": ["x", "yy"], "kind": "b"})


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def xgrammar_round(tok, vocab: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    holder: dict = {}
    setup = _time(lambda: holder.setdefault("info", xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)))
    compiler = xgr.GrammarCompiler(holder["info"], cache_enabled=False)
    compile_s = _time(lambda: holder.setdefault("g", compiler.compile_json_schema(json.dumps(SCHEMA))))
    bm = xgr.allocate_token_bitmask(1, vocab)

    def walk():
        m = xgr.GrammarMatcher(holder["g"])
        for t in ids:
            m.fill_next_token_bitmask(bm, 0)
            assert m.accept_token(t)
    first, warm = _time(walk), min(_time(walk) for _ in range(3))
    logits, bm16 = torch.randn(16, vocab), xgr.allocate_token_bitmask(16, vocab)
    apply16 = min(_time(lambda: xgr.apply_token_bitmask_inplace(logits, bm16)) for _ in range(20))
    return {"setup_s": setup, "compile_s": compile_s, "first_us_per_token": first / len(ids) * 1e6,
            "warm_us_per_token": warm / len(ids) * 1e6, "apply_16_rows_us": apply16 * 1e6}


def llguidance_round(tok, vocab: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    holder: dict = {}
    setup = _time(lambda: holder.setdefault("tok", llguidance.hf.from_tokenizer(tok, n_vocab=vocab)))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    compile_s = _time(lambda: holder.setdefault("m", llguidance.LLMatcher(holder["tok"], grammar)))
    bm = lt.allocate_token_bitmask(1, vocab)

    def walk():
        m = llguidance.LLMatcher(holder["tok"], grammar)
        for t in ids:
            lt.fill_next_token_bitmask(m, bm, 0)
            assert m.consume_token(t)
    first, warm = _time(walk), min(_time(walk) for _ in range(3))
    logits, bm16 = torch.randn(16, vocab), lt.allocate_token_bitmask(16, vocab)
    apply16 = min(_time(lambda: lt.apply_token_bitmask_inplace(logits, bm16)) for _ in range(3))
    return {"setup_s": setup, "compile_s": compile_s, "first_us_per_token": first / len(ids) * 1e6,
            "warm_us_per_token": warm / len(ids) * 1e6, "apply_16_rows_us": apply16 * 1e6}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from server.config import load_config
    from server.model import resolve_source

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "config.toml")
    folder, _ = resolve_source(cfg.model, cfg.path(cfg.model.cache_dir))
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = len(tok)
    ids = tok.encode(ANSWER, add_special_tokens=False)
    out: dict[str, list[dict]] = {"xgrammar": [], "llguidance": []}
    for k in range(args.rounds):
        for name, fn in (("xgrammar", xgrammar_round), ("llguidance", llguidance_round)):
            r = fn(tok, vocab, ids)
            out[name].append(r)
            print(f"round {k + 1} {name:>10}: " + ", ".join(f"{key} {v:.3g}" for key, v in r.items()), flush=True)
    return out


if __name__ == "__main__":
    main()

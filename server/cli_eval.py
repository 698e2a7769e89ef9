"""The `loraplex eval` command: its flags, the table's columns from them, and where the result goes.

Owns: turning `--adapters`, `--blend NAME=A:W,B:W[@TYPE]`, `--export` and `--held-out` into the
candidates training/evaluate.py scores, and printing the table (or the JSON, or JSON lines for the
job runner). The scoring is evaluate.py's; config loading and store lookups are cli.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _candidates(cfg, args: argparse.Namespace, adapter_folder: Callable[[Any, str], Path]) -> list:
    from .training.data import DataError
    from .training.evaluate import Candidate

    out = [] if args.no_base else [Candidate("base", "base")]
    names = [n for n in (args.adapters or "").split(",") if n]
    if args.held_out and args.held_out not in names:
        names.insert(0, args.held_out)
    for spec in names:
        folder = adapter_folder(cfg, spec)
        if not (folder / "adapter_config.json").is_file():
            raise DataError(f"{spec}: no adapter in the store or at {folder}")
        out.append(Candidate(folder.name if "/" in spec else spec, "adapter", folder))
    for spec in args.blend or []:
        name, sep, recipe = spec.partition("=")
        recipe, _, ctype = recipe.partition("@")
        try:
            parts = [(n, float(w)) for n, w in (p.split(":") for p in recipe.split(","))]
        except ValueError:
            raise DataError(f"--blend {spec!r}: expected NAME=ADAPTER:WEIGHT,ADAPTER:WEIGHT[@TYPE]") from None
        if not sep or not parts:
            raise DataError(f"--blend {spec!r}: expected NAME=ADAPTER:WEIGHT,ADAPTER:WEIGHT[@TYPE]")
        out.append(Candidate(name, "blend", parts=parts, part_folders={n: adapter_folder(cfg, n) for n, _ in parts},
                             combination_type=ctype or "linear", density=args.density))
    for spec in args.export or []:
        folder = Path(spec).resolve()
        if not (folder / "config.json").is_file():
            raise DataError(f"--export {spec}: not a model folder (no config.json)")
        out.append(Candidate(folder.name, "export", folder))
    if not out:
        raise DataError("nothing to evaluate: name adapters, blends or exports, or keep the base")
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one name, one column: two folders of one name would be scored as one
        raise DataError(f"two columns would be named {twice}; name blends differently, or rename a folder")
    return out


def run(args: argparse.Namespace, cfg: Any, adapter_folder: Callable[[Any, str], Path], report: Callable) -> int:
    from .atomic import write_file
    from .errors import LoraplexError
    from .training.data import DataError
    from .training.evaluate import evaluate, held_out, table

    try:
        split = None
        if args.held_out:
            data, split = held_out(adapter_folder(cfg, args.held_out))
            if args.data and Path(args.data).resolve() != data.resolve():
                raise DataError(f"--held-out {args.held_out} evaluates {data}; leave out the data argument")
        elif args.data:
            data = Path(args.data)
        else:
            raise DataError("name a JSONL file, or --held-out ADAPTER for a training run's held-out split")
        result = evaluate(_candidates(cfg, args, adapter_folder), data, cfg.model, cfg.path(cfg.model.cache_dir),
                          split=split, max_seq_len=args.max_seq_len, max_examples=args.max_examples,
                          exact=not args.no_exact, max_rank=cfg.adapters.max_lora_rank, report=report)
    except (DataError, LoraplexError) as e:
        print(f"loraplex eval: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    if args.out:
        write_file(Path(args.out), json.dumps(result, indent=1).encode())
    if args.progress == "json":
        print(json.dumps({"event": "done", **result}), flush=True)
    elif args.json:
        print(json.dumps(result, indent=1))
    else:
        print(table(result))
    return 0


def add_parser(sub: Any, offline_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    e = sub.add_parser("eval", help="loss and exact match of the base, adapters, blends and exports on a JSONL file")
    e.add_argument("data", nargs="?", help="JSONL in the trainer's shapes (every record is evaluated)")
    offline_flags(e)
    e.add_argument("--adapters", help="comma-separated store names or adapter folders")
    e.add_argument("--blend", action="append", metavar="NAME=A:W,B:W[@TYPE]",
                   help="a blend built with PEFT's add_weighted_adapter (repeatable)")
    e.add_argument("--density", type=float, help="for the ties, dare_* and magnitude_prune blends")
    e.add_argument("--export", action="append", metavar="FOLDER", help="a fused model folder (repeatable)")
    e.add_argument("--held-out", metavar="ADAPTER", help="its training run's held-out split (from its card)")
    e.add_argument("--no-base", action="store_true", help="leave the base model out of the table")
    e.add_argument("--no-exact", action="store_true", help="loss only: no greedy answers, no exact match")
    e.add_argument("--max-examples", type=int)
    e.add_argument("--max-seq-len", type=int, default=2048)
    e.add_argument("--quantization", choices=["none", "nf4", "fp4", "int8"], help="the base as it is served")
    e.add_argument("--json", action="store_true", help="print the whole result as JSON instead of the table")
    e.add_argument("--out", help="also write the JSON result to this file")



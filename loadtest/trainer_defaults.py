"""The trainer's defaults on a small fixed-format task: old defaults vs new, and QLoRA vs LoRA.

    python -m loadtest.trainer_defaults --examples 80 --epochs 2 [--out DIR]
    python -m loadtest.trainer_defaults --data data/terse.jsonl --data data/pirate.jsonl --runs new,qlora

It writes `--examples` chat records of one answer format (the json-answer style of
data/make_samples.py: `{"answer": ..., "category": ...}`) drawn from its generators, trains the
default model on them with the bundled trainer (10 % held out, the same seed and split for every
run) and prints the held-out eval loss before and after each run, its drop, steps and seconds:
  old   the defaults before the trainer issue: PEFT's preset targets (q_proj, v_proj), batch 8
  new   today's defaults (the family's seven projections, r 16, alpha 32, batch 4)
  qlora today's defaults on an nf4 base (bitsandbytes), compute in the CPU's bf16 or fp32
  loftq qlora with --loftq: LoRA starts as the fix of nf4's error that best restores each layer's
        outputs on 128 training records (training/loftq.py, calibrated)
  loftq-plain  the same with --loftq-examples 0: the plain SVD fix of the weight error
With `--data FILE` (repeatable) the runs are made on those files instead (the sample datasets),
`--rank`/`--alpha` overriding the default rank. Quality, not speed: one run each, the same data,
split and steps for new and qlora.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_data(path: Path, n: int, seed: int = 11) -> Path:
    sys.path.insert(0, str(ROOT / "data"))
    import make_samples  # the sample generators: questions and their answers in each style

    rng = random.Random(seed)
    items = make_samples.questions(rng)
    rng.shuffle(items)
    with open(path, "w") as f:
        for it in items[:n]:
            msgs = [{"role": "user", "content": it["q"]},
                    {"role": "assistant", "content": make_samples.answer("json-answer", it, rng)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=80)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--runs", default="old,new,qlora,loftq")
    ap.add_argument("--data", action="append", help="train on this JSONL instead (repeatable)")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--alpha", type=int)
    ap.add_argument("--out", help="keep the data and adapters here (default: a temporary folder)")
    args = ap.parse_args()

    from server.config import load_config
    from server.training.trainer import TrainOptions, train

    cfg = load_config(None)

    work = Path(args.out or tempfile.mkdtemp(prefix="trainer-defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    files = [Path(d) for d in args.data] if args.data else [write_data(work / "fixed-format.jsonl", args.examples)]
    runs = {"old": dict(batch_size=8, target_modules=["q_proj", "v_proj"]),  # PEFT's preset for a Llama
            "new": {}, "qlora": dict(qlora=True), "loftq": dict(qlora=True, loftq=True),
            "loftq-plain": dict(qlora=True, loftq=True, loftq_examples=0)}
    sizes = {k: v for k, v in (("rank", args.rank), ("alpha", args.alpha)) if v is not None}
    for data in files:
        by = {}
        for name in args.runs.split(","):
            opts = TrainOptions(data=data, name=f"{data.stem}-{name}", epochs=args.epochs, eval_fraction=0.1, seed=0,
                                replace=True, **{**sizes, **runs[name]})
            t0 = time.monotonic()
            card = train(opts, cfg.model, store=work / "store", cache_dir=cfg.path(cfg.model.cache_dir), quiet=True)
            secs = time.monotonic() - t0
            drop = 1 - card["eval_loss"] / card["eval_loss_before"]
            by[name] = card
            print(f"{data.name} {name:6} targets {','.join(card['target_modules'])} r {opts.rank} batch "
                  f"{opts.batch_size}: eval loss {card['eval_loss_before']:.4f} -> {card['eval_loss']:.4f} "
                  f"({100 * drop:.1f} % drop), {card['steps']} steps, {secs:.0f} s, "
                  f"warnings {len(card['warnings'])}", flush=True)
        for q in ("qlora", "loftq", "loftq-plain"):
            if "new" in by and q in by:
                gap = by[q]["eval_loss"] / by["new"]["eval_loss"] - 1
                print(f"{data.name} {q} vs lora eval loss: {by[q]['eval_loss']:.4f} vs "
                      f"{by['new']['eval_loss']:.4f} ({100 * gap:+.1f} %)", flush=True)
    print(f"data and adapters in {work}")


if __name__ == "__main__":
    main()

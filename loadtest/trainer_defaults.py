"""The trainer's defaults on a small fixed-format task: old defaults vs new, and QLoRA vs LoRA.

    python -m loadtest.trainer_defaults --examples 80 --epochs 2 [--out DIR]

It writes `--examples` chat records of one answer format (the json-answer style of
data/make_samples.py: `{"answer": ..., "category": ...}`) drawn from its generators, trains the
default model on them with the bundled trainer (10 % held out, the same seed and split for every
run) and prints the held-out eval loss before and after each run, its drop, steps and seconds:
  old   the defaults before the trainer issue: PEFT's preset targets (q_proj, v_proj), batch 8
  new   today's defaults (the family's seven projections, r 16, alpha 32, batch 4)
  qlora today's defaults on an nf4 base (bitsandbytes), compute in the CPU's bf16 or fp32
Quality, not speed: one run each, the same data and steps for new and qlora.
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
    ap.add_argument("--runs", default="old,new,qlora")
    ap.add_argument("--out", help="keep the data and adapters here (default: a temporary folder)")
    args = ap.parse_args()

    from server.config import load_config
    from server.training.trainer import TrainOptions, train

    cfg = load_config(None)

    work = Path(args.out or tempfile.mkdtemp(prefix="trainer-defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work / "fixed-format.jsonl", args.examples)
    runs = {"old": dict(target_modules=None, batch_size=8, old_preset=True), "new": {}, "qlora": dict(qlora=True)}
    rows = []
    for name in args.runs.split(","):
        kw = dict(runs[name])
        if kw.pop("old_preset", False):
            kw["target_modules"] = ["q_proj", "v_proj"]  # what PEFT's preset gives a Llama
        opts = TrainOptions(data=data, name=name, epochs=args.epochs, eval_fraction=0.1, seed=0, replace=True, **kw)
        t0 = time.monotonic()
        card = train(opts, cfg.model, store=work / "store", cache_dir=cfg.path(cfg.model.cache_dir), quiet=True)
        secs = time.monotonic() - t0
        drop = 1 - card["eval_loss"] / card["eval_loss_before"]
        rows.append((name, card, drop, secs))
        print(f"{name:6} targets {','.join(card['target_modules'])} r {opts.rank} batch {opts.batch_size}: eval loss "
              f"{card['eval_loss_before']:.4f} -> {card['eval_loss']:.4f} ({100 * drop:.1f} % drop), "
              f"{card['steps']} steps, {secs:.0f} s, warnings {len(card['warnings'])}", flush=True)
    by = {n: c for n, c, _, _ in rows}
    if "new" in by and "qlora" in by:
        gap = by["qlora"]["eval_loss"] / by["new"]["eval_loss"] - 1
        print(f"qlora vs lora eval loss: {by['qlora']['eval_loss']:.4f} vs {by['new']['eval_loss']:.4f} "
              f"({100 * gap:+.1f} %)")
    print(f"data and adapters in {work}")


if __name__ == "__main__":
    main()

"""Where one adapter load's time goes, quiet and in-process: hash, read and validate, prepare
(PEFT scaling, transposes), the copy into a LoRA slot, the removal. Default model, float32.

    python -m loadtest.load_breakdown [--count 8] [--prefix hot16]

Reads the benchmark adapters `loadtest.compare` makes in adapters/.bench (run it once first).
Prints one line per adapter; the first one also pays the page cache and the pool's first use.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--prefix", default="hot16")
    args = ap.parse_args(argv)

    import torch

    from server.config import load_config
    from server.engine.runner import ModelRunner
    from server.lora.slots import prepare
    from server.lora.weights import content_hash, read_adapter
    from server.model import load_model

    torch.set_num_threads(2)
    cfg = load_config(overrides={"model.dtype": "float32"})
    runner = ModelRunner(load_model(cfg.model, ROOT / ".cache"), slots=16, num_blocks=256, block_size=16)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, 1000 * (time.perf_counter() - t0)
    for i in range(args.count):
        p = ROOT / "adapters" / ".bench" / f"{args.prefix}-{i}"
        _, th = timed(lambda p=p: content_hash(p))
        files, tr = timed(lambda p=p: read_adapter(p, max_rank=64))
        prep, tp = timed(lambda p=p, f=files: prepare(p.name, f, runner.pool, runner.slots.model_modules))
        _, ti = timed(lambda p=p, x=prep: runner.slots.install(p.name, x, identity=p.name))
        _, tu = timed(lambda p=p: runner.slots.remove(p.name))
        print(f"{p.name}: hash {th:.0f} ms, read+hash+validate {tr:.0f} ms, prepare {tp:.0f} ms, "
              f"slot copy {ti:.0f} ms, remove {tu:.0f} ms")


if __name__ == "__main__":
    main()

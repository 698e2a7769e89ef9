"""Make random (not no-op) PEFT LoRA adapters for a base model: for benchmarks and demos.

    python -m loadtest.make_adapters --out adapters --prefix demo --count 1 --rank 8 --targets q_proj,v_proj

The weights are random (`init_lora_weights=False`, then scaled), so an adapter changes the
output without teaching the model anything. Folders are written to a staging name and renamed.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch


def base_folder(spec: str, config: str | None) -> Path:
    from server.config import load_config
    from server.model import resolve_source

    cfg = load_config(config, overrides={"model.model": spec})
    return resolve_source(cfg.model, cfg.path(cfg.model.cache_dir))[0]


def make(base: Path, out: Path, name: str, rank: int, alpha: int, targets: list[str], seed: int,
         scale: float) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                            init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(scale)
    peft.peft_config["default"].base_model_name_or_path = base.name  # not this machine's path
    dst = out / name
    staging = out / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    peft.save_pretrained(staging)
    (staging / "README.md").write_text(
        f"# {name}\n\nRandom LoRA weights (rank {rank}, alpha {alpha}, targets {targets}, seed {seed}, "
        f"scale {scale}) for {base.name}, made by `python -m loadtest.make_adapters`. It changes the "
        "output without teaching the model anything: for demos and benchmarks.\n")
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(staging, dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="default", help="default | model folder | .gguf (as loraplex serve --model)")
    p.add_argument("--config", default="config.toml" if Path("config.toml").is_file() else None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--prefix", default="rand")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=0, help="0 = 2 x rank")
    p.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--scale", type=float, default=0.3, help="multiplies the random weights")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = base_folder(a.base, a.config)
    a.out.mkdir(parents=True, exist_ok=True)
    targets = "all-linear" if a.targets == "all-linear" else a.targets.split(",")
    for i in range(a.count):
        name = a.prefix if a.count == 1 else f"{a.prefix}-{i}"
        print(make(base, a.out, name, a.rank, a.alpha or 2 * a.rank, targets, a.seed + i, a.scale))


if __name__ == "__main__":
    main()

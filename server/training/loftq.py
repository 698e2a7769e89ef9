"""LoftQ-style initialisation for QLoRA: start each LoRA at the best rank-r fix of nf4's error.

Owns: `init_from_residual`, which, for every LoRA layer over a bitsandbytes 4-bit weight, sets
B and A so that scaling * B @ A is the best rank-r approximation (SVD, Eckart-Young) of
W - dequantize(Q(W)), the part of the full-precision weight the nf4 base lost; and `full_weights`,
which reads those full-precision weights from the base's safetensors files one tensor at a time.
This is one LoftQ iteration with the quantization fixed (LoftQ, Li et al. 2023; the same as PEFT's
`replace_lora_weights_loftq`, which needs CUDA). Measured on the default model
(loadtest/trainer_defaults.py, README table): at rank 16 it closes the gap between QLoRA and
LoRA on the 80-example case; at rank 8 on the samples it narrows it on two of three.

The adapter it makes belongs to the nf4 base: on a full-precision base the same A and B add a
correction for an error that base never had. The trainer records `base_quantization` in the
card; this module does not know about cards, training or serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def full_weights(folder: Path) -> Callable[[str], torch.Tensor]:
    """A reader of the base's full-precision tensors by name, from model.safetensors or its shards."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else dict.fromkeys(_names(folder / "model.safetensors"), "model.safetensors"))

    def read(name: str) -> torch.Tensor:
        with safe_open(str(folder / where[name]), framework="pt") as f:
            return f.get_tensor(name)
    return read


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def low_rank_fix(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with scaling * B @ A the best rank-`rank` approximation of `residual` [out, in]."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root) / scaling, root[:, None] * vh[:rank]


@torch.no_grad()
def init_from_residual(peft_model: Any, weights: Callable[[str], torch.Tensor], adapter: str = "default") -> int:
    """Initialise every LoRA layer over a 4-bit weight from the quantization residual; returns how many."""
    import bitsandbytes.functional as bnbf

    done = 0
    for name, module in peft_model.named_modules():
        base: Any = getattr(module, "base_layer", None)
        state = getattr(getattr(base, "weight", None), "quant_state", None)
        if base is None or state is None or adapter not in getattr(module, "lora_A", {}):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"   # the name in the base's own files
        full = weights(key).float()
        quantized = bnbf.dequantize_4bit(base.weight.data, state).float()
        b, a = low_rank_fix(full - quantized, module.r[adapter], module.scaling[adapter])
        module.lora_B[adapter].weight.copy_(b)
        module.lora_A[adapter].weight.copy_(a)
        done += 1
    return done

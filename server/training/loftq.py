"""LoftQ-style initialisation for QLoRA: start each LoRA at the best rank-r fix of nf4's error.

Owns: `init_from_residual`, which, for every LoRA layer over a bitsandbytes 4-bit weight, sets
B and A so that scaling * B @ A is the best rank-r approximation of E = W - dequantize(Q(W)), the
part of the full-precision weight the nf4 base lost; `input_grams`, which measures what that
"best" should weigh; and `full_weights`, which reads the full-precision weights from the base's
safetensors files one tensor at a time.

Two notions of best, one code path (`low_rank_fix`):
- plain (no Gram matrix): the Frobenius-best fix of E itself, by SVD (Eckart-Young). This is one
  LoftQ iteration with the quantization fixed (LoftQ, Li et al. 2023; PEFT's
  `replace_lora_weights_loftq`, which needs CUDA).
- calibrated (the trainer's default, from its own training records): the fix that best restores
  the layer's *outputs* on those inputs, min ||X (E - L)^T||_F over rank-r L, as CLoQ (Deng et al.
  2025) does. With H = X^T X + damping = R R^T (R its symmetric square root) that is
  L = SVD_r(E R) R^-1. Activations are far from isotropic (a few channels carry most of the
  energy), so the rank-r budget goes where the inputs are; the plain fix spends it evenly.
Measured on the default model's samples (README, loadtest/trainer_defaults.py): QLoRA alone ends
17-20 % above LoRA's eval loss, after the plain fix 8-22 % (on the two it ran on), after the
calibrated one within 5 % of LoRA or below it on all three.
Only one iteration is possible here: the resident base is Q(W), shared with every other adapter,
so the quantized weights cannot be re-chosen around the adapter as iterated LoftQ does.

The adapter it makes belongs to the nf4 base: on a full-precision base the same A and B add a
correction for an error that base never had. The trainer records `base_quantization` in the
card; this module does not know about cards, training or serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

DAMPING = 0.01   # of the mean diagonal of H, as GPTQ: keeps R invertible along unused input directions


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


def low_rank_fix(residual: torch.Tensor, rank: int, scaling: float, gram: torch.Tensor | None = None,
                 damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with scaling * B @ A the best rank-`rank` approximation of `residual` [out, in].

    Without `gram`, best in Frobenius norm; with `gram` = X^T X [in, in] of the layer's inputs,
    best for the outputs on those inputs (see the module docstring). float64 inside: the square
    root of H has a condition number of up to 1/damping's root.
    """
    e = residual.double()
    if gram is None:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        root = s[:rank].sqrt()
        return ((u[:, :rank] * root) / scaling).float(), (root[:, None] * vh[:rank]).float()
    h = gram.double()
    h = h + damping * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam, q = torch.linalg.eigh(h)
    lam = lam.clamp_min(lam.max() * 1e-12)
    u, s, vh = torch.linalg.svd(e @ ((q * lam.sqrt()) @ q.T), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]) @ ((q / lam.sqrt()) @ q.T)     # [r, in]: times R^-1
    return ((u[:, :rank] * root) / scaling).float(), a.float()


def _quantized_layers(peft_model: Any, adapter: str) -> Iterable[tuple[str, Any]]:
    for name, module in peft_model.named_modules():
        base: Any = getattr(module, "base_layer", None)
        state = getattr(getattr(base, "weight", None), "quant_state", None)
        if base is not None and state is not None and adapter in getattr(module, "lora_A", {}):
            yield name, module


@torch.no_grad()
def input_grams(peft_model: Any, inputs: Iterable[list[int]], adapter: str = "default") -> dict[str, torch.Tensor]:
    """X^T X [in, in] of each 4-bit LoRA layer's inputs over `inputs` (token id lists), adapter off.

    One sequence per forward, so no padding enters X. Layers fed one tensor (q/k/v, gate/up)
    see the same input: its X^T X is computed once per forward and added to each one's sum.
    """
    grams: dict[str, torch.Tensor] = {}
    # This forward's inputs -> (the input, its X^T X). The input is kept so that its memory is not
    # freed and handed to a later layer's input of the same shape, which would then look "seen".
    seen: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: Any, args: tuple, _out: Any) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                seen[key] = (x, flat.T @ flat)
            gram = seen[key][1]
            grams[name] = grams[name] + gram if name in grams else gram.clone()
        return record

    handles = [m.base_layer.register_forward_hook(hook(n)) for n, m in _quantized_layers(peft_model, adapter)]
    device = next(peft_model.parameters()).device
    training = peft_model.training
    peft_model.eval()   # a base with dropout would otherwise measure noise
    try:
        with peft_model.disable_adapter():
            for ids in inputs:
                seen.clear()
                peft_model(input_ids=torch.tensor([ids], device=device))
    finally:
        peft_model.train(training)
        for h in handles:
            h.remove()
    return grams


@torch.no_grad()
def init_from_residual(peft_model: Any, weights: Callable[[str], torch.Tensor], adapter: str = "default",
                       grams: dict[str, torch.Tensor] | None = None) -> int:
    """Initialise every LoRA layer over a 4-bit weight from the quantization residual; returns how many.

    With `grams` (from `input_grams`), each fix is the calibrated one; without, the plain one.
    """
    import bitsandbytes.functional as bnbf

    done = 0
    for name, module in _quantized_layers(peft_model, adapter):
        base = module.base_layer
        key = name.removeprefix("base_model.model.") + ".weight"   # the name in the base's own files
        quantized = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        full = weights(key).to(quantized.device, torch.float32)   # read on CPU; the base may be on a GPU
        gram = grams.get(name) if grams is not None else None
        b, a = low_rank_fix(full - quantized, module.r[adapter], module.scaling[adapter], gram)
        module.lora_B[adapter].weight.copy_(b)
        module.lora_A[adapter].weight.copy_(a)
        done += 1
    return done

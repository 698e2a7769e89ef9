"""The trainer's recommended defaults, in one place: what a LoRA targets per architecture family,
and the check that a run is long enough to learn anything.

Owns: `FAMILIES` (the table the README prints: Llama/Qwen/Mistral-like models get every attention
and MLP projection, GPT-2 its fused attention, projection and MLP layers, BLOOM its four linear
layers, anything else PEFT's `all-linear`), the presets `--target-modules` takes by name
(`targets_for`: default, attention, mlp, all-linear), and `short_run` (a warning when a run
has fewer than `MIN_STEPS` optimizer steps or sees fewer supervised tokens than it trains
parameters). The numbers (r 16, alpha 32, lr 2e-4, 3 % warm-up, batch 4) are the common QLoRA/PEFT
recipe; PEFT's own preset for Llama (q_proj and v_proj only) learns a fixed answer format far more
slowly (the trainer issue measured 20 % vs 78 % eval-loss drop).

It knows nothing of transformers' Trainer; trainer.py asks it before the run and records the answer.
"""

from __future__ import annotations

import math

# family name -> (model_type values, attention projections, MLP projections); the default is both.
# GPT-2 and BLOOM name a module in both halves alike (c_proj, dense), so their halves are paths.
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
               "gemma3_text", "phi3", "olmo2", "granite"),
              ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "gpt2": (("gpt2",), ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
    "bloom": (("bloom",), ("self_attention.query_key_value", "self_attention.dense"),
              ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
}
OTHER = "all-linear"
# --target-modules NAME: a preset instead of a module list.
PRESETS = ("default", "attention", "mlp", "all-linear")

RANK, ALPHA, LEARNING_RATE, WARMUP_RATIO, BATCH_SIZE = 16, 32, 2e-4, 0.03, 4
MIN_STEPS = 50
# --loftq: how many training records calibrate the initial fix of nf4's error (loftq.py); 0: uncalibrated.
LOFTQ_EXAMPLES = 128


def family_of(model_type: str) -> str:
    return next((f for f, (types, _, _) in FAMILIES.items() if model_type in types), "other")


def targets_for(model_type: str, preset: str = "default") -> list[str] | str:
    """The target modules of `preset` for a model of this `config.model_type`: the family's default
    (every attention and MLP projection), one half of it, or PEFT's all-linear. A model of no known
    family gets all-linear as its default and has no halves (ValueError)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown target-module preset {preset!r} (presets: {', '.join(PRESETS)})")
    fam = family_of(model_type)
    if preset == "all-linear" or (fam not in FAMILIES and preset == "default"):
        return OTHER
    if fam not in FAMILIES:
        raise ValueError(f"the preset {preset!r} needs a known architecture family; {model_type!r} is none of "
                         f"{', '.join(FAMILIES)} (name the modules, or use all-linear)")
    _, attention, mlp = FAMILIES[fam]
    return list({"default": attention + mlp, "attention": attention, "mlp": mlp}[preset])


def optimizer_steps(examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    """What transformers' Trainer will run (one device): ceil(examples / batch) / accum per epoch."""
    if max_steps > 0:
        return max_steps
    per_epoch = max(math.ceil(math.ceil(examples / batch_size) / grad_accum), 1)
    return math.ceil(per_epoch * epochs)


def short_run(steps: int, tokens_seen: int, trainable: int) -> str | None:
    """One line with the numbers and what to change, or None for a run long enough."""
    problems, advice = [], []
    if steps < MIN_STEPS:
        problems.append(f"{steps} optimizer steps (fewer than {MIN_STEPS})")
        advice.append("raise --epochs or lower --batch-size (or --grad-accum) for more steps, or the adapter may "
                      "learn little")
    if tokens_seen < trainable:
        problems.append(f"{tokens_seen} supervised tokens seen for {trainable} trainable parameters")
        advice.append("add data or lower --rank, or it may learn the examples rather than the task (watch the "
                      "eval loss)")
    if not problems:
        return None
    return "this run is short: " + " and ".join(problems) + "; " + "; ".join(advice)

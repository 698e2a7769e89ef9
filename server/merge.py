"""Fused export: an adapter (or a saved blend) merged into the base and written as a plain model folder.

Owns: loading the base for an export (a bitsandbytes base is dequantized, and
the report says so), fusing with PEFT's `merge_and_unload`, writing
safetensors + config + tokenizer (with its chat template) to a staging
folder, and verifying before publishing: the staged folder is reloaded with
plain transformers and its logits on a few probe prompts are compared with
the unmerged adapter on the same base. NaN or a difference beyond the
tolerance refuses the export; otherwise the folder is renamed into place,
whole or not at all.

The merge math is PEFT's. This module does not know about HTTP or the
registry; callers pass an adapter folder and an output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic import publish, staging_path
from .config import ModelConfig
from .lora.weights import describe_adapter
from .model import load_model

log = logging.getLogger("loraplex.merge")

CARD_FILE = "loraplex-export.json"
PROBES = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
]
# Largest |fused - unmerged| logit allowed, by the dtype the export is written in.
# fp32: rounding of W + s*B@A against W@x + s*B@(A@x) stays far below this on real models.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}


class ExportError(RuntimeError):
    """The export was refused or failed; nothing was published."""


def _probe_ids(tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = p
        out.append(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
    return out


@torch.no_grad()
def _logits(model: Any, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in probes]


def _base_for_export(model_cfg: ModelConfig, cache_dir: Path, report: Callable[[dict], None]) -> Any:
    loaded = load_model(model_cfg, cache_dir)
    model = loaded.model
    if loaded.quantization != "none":
        dtype = torch.float32 if loaded.device.type == "cpu" else loaded.dtype
        report({"event": "message", "message": f"the base is quantized ({loaded.quantization}); it is dequantized "
                f"to {str(dtype).removeprefix('torch.')} for the export, so the fused model is full precision"})
        model = model.dequantize(dtype=dtype)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(dtype)
    return loaded, model


def fuse(adapter: Path, out: Path, model_cfg: ModelConfig, *, cache_dir: Path, tolerance: float | None = None,
         replace: bool = False, report: Callable[[dict], None] | None = None) -> dict:
    """Merge `adapter` into the base, verify, and publish the model folder `out`; return the export card."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = report or (lambda _e: None)
    adapter, out = Path(adapter), Path(out)
    info = describe_adapter(adapter)  # safetensors only, config readable: refused before any loading
    if out.exists() and not replace:
        raise ExportError(f"{out} already exists; choose another name or pass --replace")
    started = time.time()
    loaded, base = _base_for_export(model_cfg, cache_dir, report)
    dtype = next(base.parameters()).dtype
    tol = TOLERANCE.get(dtype, 0.25) if tolerance is None else tolerance
    peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False).eval()
    probes = _probe_ids(loaded.tokenizer, PROBES)
    reference = _logits(peft_model, probes)
    report({"event": "progress", "stage": "merging"})
    try:
        merged = peft_model.merge_and_unload()
    except (RuntimeError, ValueError) as e:  # e.g. a lora_bias on a base layer without a bias
        raise ExportError(f"PEFT cannot fuse this adapter into the base: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out.parent, out.name)
    try:
        merged.save_pretrained(str(staging))
        loaded.tokenizer.save_pretrained(str(staging))
        report({"event": "progress", "stage": "verifying"})
        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype, local_files_only=True).eval()
        fused = _logits(reloaded, probes)
        diff = max(float((a - b).abs().max()) for a, b in zip(reference, fused))
        if not all(torch.isfinite(t).all() for t in fused) or not math.isfinite(diff):
            raise ExportError("the fused model produces non-finite logits; nothing was published")
        if diff > tol:
            raise ExportError(f"the fused model's logits differ from the adapter's by {diff:.3g} "
                              f"(tolerance {tol:g}); nothing was published")
        card = {
            "adapter": str(adapter), "adapter_sha256": info.sha256, "rank": info.rank,
            "base_model": loaded.model_id, "base_source": str(model_cfg.model),
            "base_quantization": loaded.quantization, "dtype": str(dtype).removeprefix("torch."),
            "probes": len(PROBES), "max_abs_logit_diff": diff, "tolerance": tol,
            "seconds": round(time.time() - started, 1),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (staging / CARD_FILE).write_text(json.dumps(card, indent=1))
        try:
            publish(staging, out, replace=replace)
        except FileExistsError:
            raise ExportError(f"{out} appeared during the export; nothing was published") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s + %s to %s (max |logit diff| %.3g)", loaded.model_id, adapter, out, diff)
    report({"event": "done", "path": str(out), "card": card})
    return card

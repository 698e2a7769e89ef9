"""Reading and checking a PEFT LoRA folder before any weight touches the model.

Owns: the rules for what an adapter folder may contain (safetensors only;
never a pickle, so never `.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`), reading its
`adapter_config.json` with limits and through the allow-list (`config_check.py`)
into a `LoraConfig`, floating-point weights only, and its identity (sha256 over
config and weights, size on disk). Values are checked finite as stored here and
again in `slots.prepare`, in the dtype they are served in. It also reads, advisorily, the base a
LoftQ adapter was made for from loraplex's training card (`trained_for`): such an adapter
corrects nf4's error and is wrong on any other base.

It does not know the base model; matching target modules and shapes against
the base is the runner's job when it attaches the adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapter
from .config_check import MAX_CONFIG_BYTES, check_raw_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "training.json"   # loraplex's training card (server/training/trainer.py writes it)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@dataclass(frozen=True)
class AdapterInfo:
    """What is known about an adapter once read; holds no tensors."""

    folder: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    sha256: str
    size_bytes: int
    # Variants PEFT cannot blend exactly (DoRA's magnitudes, LoRA biases): such an adapter is
    # served alone, never a source of a blend or of a per-request mix.
    variants: tuple[str, ...] = ()
    # The quantization of the only base it is right on ("nf4" for a LoftQ adapter), else None.
    base_quantization: str | None = None


def trained_for(folder: Path) -> str | None:
    """The base quantization a LoftQ adapter was initialised against, from its training card.

    Advisory: a card that is missing, large or unreadable says nothing (None), and nothing is refused
    for it; what the adapter computes is PEFT's either way. The engine warns on a mismatch.
    """
    path = Path(folder) / CARD_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        card = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    # Allow-listed: the card's value is shown to admins and compared, never used for anything else.
    if isinstance(card, dict) and card.get("loftq") is True and card.get("base_quantization") in ("nf4", "fp4", "int8"):
        return str(card["base_quantization"])
    return None


def variants_of(config: Any, tensor_names: Any = ()) -> tuple[str, ...]:
    """The variant names of a config (a LoraConfig or its raw JSON object) and its tensors' names."""
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    found = [label for key, label in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"),
                                      ("modules_to_save", "modules_to_save")) if get(key)]
    if any("lora_embedding_" in k for k in tensor_names):
        found.append("embedding LoRA")
    return tuple(found)


def _tensor_names(path: Path) -> list[str]:
    """A safetensors file's tensor names, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # a broken file: listed now, refused with its reason when it is loaded (read_adapter)
        return []


@dataclass(frozen=True)
class AdapterFiles:
    info: AdapterInfo
    config: Any                     # peft.LoraConfig
    tensors: dict[str, Any]         # name -> torch.Tensor, on CPU


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_config_json(cfg_path: Path) -> Any:
    """The parsed config file, with a size cap; InvalidAdapter for anything unreadable."""
    try:
        if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{cfg_path}: larger than {MAX_CONFIG_BYTES} bytes", code="invalid_config")
        return json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise InvalidAdapter(f"{cfg_path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                             code="invalid_config") from None


def describe_adapter(folder: Path) -> AdapterInfo:
    """What the registry lists for an adapter not (yet) in memory: config and file identity only.
    Full validation happens when it is loaded (`read_adapter`)."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        raw = read_config_json(cfg_path)
        if not isinstance(raw, dict):
            raise InvalidAdapter(f"{cfg_path}: not a JSON object", code="invalid_config")
        raw = dict(raw)  # a JSON object: str -> Any
        targets = raw.get("target_modules") or ()
        target_tuple = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
        return AdapterInfo(folder.resolve(), int(raw["r"]), float(raw.get("lora_alpha", raw["r"])), target_tuple,
                           _hash_files([cfg_path, w_path]), cfg_path.stat().st_size + w_path.stat().st_size,
                           variants_of(raw, _tensor_names(w_path)), trained_for(folder))
    except (OSError, ValueError, KeyError, TypeError, OverflowError, AttributeError) as e:
        raise InvalidAdapter(f"{folder}: unreadable adapter ({type(e).__name__}: {e})", code="invalid_config") from None


def content_hash(folder: Path) -> str:
    """sha256 over config and weights: the adapter's identity for idempotent loads."""
    try:
        return _hash_files([Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE])
    except OSError:
        return ""


def read_adapter(folder: Path, *, max_rank: int) -> AdapterFiles:
    """Validate and read a PEFT LoRA folder. Raises InvalidAdapter with the reason."""
    import torch
    from peft import LoraConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder", code="adapter_not_found")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapter(f"{folder} holds pickle files ({', '.join(pickles)}); only safetensors are loaded",
                             code="pickle_refused")
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise InvalidAdapter(f"{folder} has no {CONFIG_FILE}", code="missing_config")
    if not w_path.is_file():
        raise InvalidAdapter(f"{folder} has no {WEIGHTS_FILE}", code="missing_weights")
    raw = read_config_json(cfg_path)
    if isinstance(raw, dict) and raw.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"{cfg_path}: peft_type must be LORA, got {raw.get('peft_type')!r}", code="invalid_config")
    check_raw_config(raw, max_rank=max_rank)  # before PEFT sees it, before anything touches the model
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as e:  # PEFT raises TypeError/ValueError for bad fields
        raise InvalidAdapter(f"{cfg_path}: not a valid LoRA config ({e})", code="invalid_config") from None
    try:
        tensors = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidAdapter(f"{w_path}: unreadable safetensors ({e})", code="invalid_weights") from None
    if not tensors:
        raise InvalidAdapter(f"{w_path}: holds no tensors", code="invalid_weights")
    for name, t in tensors.items():
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise InvalidAdapter(f"{w_path}: tensor {name} is {str(t.dtype).removeprefix('torch.')}; LoRA weights "
                                 "are floating point (float16, bfloat16, float32 or float64)", code="invalid_weights")
        if not bool(torch.isfinite(t).all()):  # as stored; slots.prepare checks again as served
            raise InvalidAdapter(f"{w_path}: tensor {name} holds NaN or Inf", code="non_finite_weights")
    targets = config.target_modules
    target_tuple = (targets,) if isinstance(targets, str) else tuple(sorted(targets or ()))
    info = AdapterInfo(
        folder=folder.resolve(),
        rank=config.r,
        alpha=float(config.lora_alpha),
        target_modules=target_tuple,
        sha256=_hash_files([cfg_path, w_path]),
        size_bytes=cfg_path.stat().st_size + w_path.stat().st_size,
        variants=variants_of(config, tensors),
        base_quantization=trained_for(folder),
    )
    return AdapterFiles(info=info, config=config, tensors=tensors)

"""The allow-list for a tenant's `adapter_config.json`: what the serving path computes exactly.

Owns: `check_raw_config`, run on the parsed JSON before PEFT sees it and before anything touches
the model. Every key must be one this module knows; its value must be one the slot path serves
exactly (`slots.prepare`: LoRA A/B on linear layers, PEFT's scaling with rsLoRA, rank_pattern and
alpha_pattern, DoRA, LoRA biases; trained copies of the embeddings, head and norms and LoRA on the
input embeddings, in swap.py). Anything else is an InvalidAdapter (422) naming the field:
- training-time initialisations other than the random ones (`init_lora_weights` "pissa", "olora",
  "corda", "eva", "loftq", "orthogonal", ...): PEFT runs them on the base's weights when it builds
  the layers, and an adapter saved from them expects a changed base;
- variants the slot path does not compute (trainable tokens,
  layer replication, LoRA on parameters, activated LoRA, QALoRA, Megatron layers, and the newer
  tuners PEFT groups under LoRA);
- numbers that are not finite or out of range (r and every rank in rank_pattern within
  max_lora_rank, lora_alpha and alpha_pattern finite).
It knows PEFT's config field names, not tensors or models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import InvalidAdapter

MAX_CONFIG_BYTES = 1 << 20          # an adapter_config.json is a few hundred bytes
MAX_PATTERN_ENTRIES = 4096


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _strs(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _off(v: Any) -> bool:
    """Unset: the field's feature is not used."""
    return v is None or v is False or v == [] or v == {}


# field -> (accepts the value?, what it must be, for the message)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # metadata: no effect on what is computed
    "task_type": (lambda v: v is None or isinstance(v, str), "a string"),
    "peft_type": (lambda v: v in (None, "LORA"), '"LORA"'),
    "auto_mapping": (lambda v: v is None or isinstance(v, dict), "an object"),
    "peft_version": (lambda v: v is None or isinstance(v, str), "a string"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
    "revision": (lambda v: v is None or isinstance(v, str), "a string"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),  # training only
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),  # GPT-2's Conv1D layout
    "runtime_config": (lambda v: v is None or (isinstance(v, dict) and set(v) <= {"ephemeral_gpu_offload"}),
                       'an object with only "ephemeral_gpu_offload"'),
    "megatron_core": (lambda v: v is None or isinstance(v, str), "a string"),   # used only with megatron_config
    "qalora_group_size": (lambda v: v is None or _is_int(v), "an integer"),   # used only with use_qalora
    "ensure_weight_tying": (lambda v: isinstance(v, bool), "true or false"),  # used only with trained modules
    # what the slot path computes
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),     # slots.prepare: DoRA's row factor
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),    # slots.prepare: scale * lora_B.bias
    # swap.py: trained copies of the embeddings, the head or norms, per row; other modules refused there
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and len(v) <= 64
                                                and all(isinstance(x, str) and 0 < len(x) <= 200 for x in v)),
                        "a list of module names"),
    "target_modules": (_strs, "a string or a list of strings"),
    "exclude_modules": (_strs, "a string or a list of strings"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                            "an integer or a list of integers"),
    "layers_pattern": (_strs, "a string or a list of strings"),
    "rank_pattern": (lambda v: isinstance(v, dict) and len(v) <= MAX_PATTERN_ENTRIES
                     and all(_is_int(x) and x > 0 for x in v.values()), "an object of positive integer ranks"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and len(v) <= MAX_PATTERN_ENTRIES
                      and all(_is_number(x) for x in v.values()), "an object of finite numbers"),
    # Only the random initialisations: they never read or write the base, and the file's
    # weights replace what they made.
    "init_lora_weights": (lambda v: v in (True, False, "gaussian"), 'true, false or "gaussian"'),
    "bias": (lambda v: v == "none", '"none" (trained base biases are not served)'),
}
# Features the slot path does not compute: accepted only when unset.
_UNSERVED = {
    "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters", "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA", "use_qalora": "QALoRA", "loftq_config": "LoftQ",
    "eva_config": "EVA initialisation", "corda_config": "CorDA initialisation", "lora_ga_config": "LoRA-GA",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA",
}


def _refuse(field: str, message: str) -> InvalidAdapter:
    return InvalidAdapter(f"adapter_config.json: {field}: {message}", code="unsupported_adapter")


def check_raw_config(raw: Any, *, max_rank: int) -> None:
    """Refuse a config this server would not serve exactly (see the module docstring)."""
    if not isinstance(raw, dict):
        raise InvalidAdapter(f"adapter_config.json must be a JSON object, got {type(raw).__name__}",
                             code="invalid_config")
    if "r" not in raw:
        raise _refuse("r", "missing")
    for field, value in raw.items():
        if field in _UNSERVED:
            if not _off(value):
                raise _refuse(field, f"{_UNSERVED[field]} is not served exactly by loraplex; refused")
            continue
        rule = _RULES.get(field)
        if rule is None:
            raise _refuse(field, "an unknown config field; refused rather than guessed at")
        ok, what = rule
        if not ok(value):
            raise _refuse(field, f"must be {what}, got {value!r}"[:300])
    ranks = [raw["r"], *(raw.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise InvalidAdapter(f"rank {max(ranks)} exceeds max_lora_rank {max_rank}"
                             + (" (in rank_pattern)" if max(ranks) != raw["r"] else ""), code="rank_too_high")

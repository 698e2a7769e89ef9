"""Blends: named weighted combinations of loaded adapters, made by PEFT.

Owns: the table of combination methods (PEFT `add_weighted_adapter`'s, with
what each requires), checking a blend request against the adapters it names
before any work, building it on the model (engine thread), and writing an
adapter's weights out as an ordinary PEFT folder.

The merge math is PEFT's; this module decides what may be asked of it and
turns its ValueErrors into 422s with the reason.

Per-request blends (`adapters: [{name, weight}]` in a completion request) use
"cat": it concatenates the scaled A and B matrices, so the blend's delta is
exactly sum_i weight_i * scale_i * B_i @ A_i, whatever the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidAdapter
from .weights import CONFIG_FILE, WEIGHTS_FILE

# Largest |weight| in a blend or a per-request mix: weight x scale x B @ A must stay finite in
# the compute dtype (fp16's largest is 65504), and no useful blend weighs an adapter 1000 times.
MAX_WEIGHT = 1e3


@dataclass(frozen=True)
class Method:
    equal_ranks: bool               # PEFT refuses mixed ranks for these
    uses_density: bool              # pruning methods take `density`


METHODS: dict[str, Method] = {
    "linear": Method(equal_ranks=True, uses_density=False),
    "cat": Method(equal_ranks=False, uses_density=False),
    "svd": Method(equal_ranks=False, uses_density=False),
    "ties": Method(equal_ranks=True, uses_density=True),
    "ties_svd": Method(equal_ranks=False, uses_density=True),
    "dare_linear": Method(equal_ranks=True, uses_density=True),
    "dare_ties": Method(equal_ranks=True, uses_density=True),
    "magnitude_prune": Method(equal_ranks=True, uses_density=True),
}


@dataclass(frozen=True)
class BlendSpec:
    adapters: tuple[tuple[str, float], ...]   # (name, weight)
    combination_type: str = "linear"
    density: float | None = None

    def recipe(self) -> dict[str, Any]:
        return {"adapters": [{"name": n, "weight": w} for n, w in self.adapters],
                "combination_type": self.combination_type, "density": self.density}

    @classmethod
    def from_recipe(cls, r: dict[str, Any]) -> BlendSpec:
        return cls(tuple((a["name"], float(a["weight"])) for a in r["adapters"]), r["combination_type"],
                   r.get("density"))


def check_spec(spec: BlendSpec, ranks: dict[str, int]) -> None:
    """Refuse what PEFT would refuse, or what would make no sense, before any work.

    `ranks` maps each registered adapter name to its rank.
    """
    method = METHODS.get(spec.combination_type)
    if method is None:
        raise InvalidAdapter(f"unknown combination_type {spec.combination_type!r}; valid: {', '.join(METHODS)}",
                             code="invalid_blend")
    if not spec.adapters:
        raise InvalidAdapter("a blend needs at least one adapter", code="invalid_blend")
    names = [n for n, _ in spec.adapters]
    if len(set(names)) != len(names):
        raise InvalidAdapter(f"an adapter is named twice in the blend: {names}", code="invalid_blend")
    unknown = [n for n in names if n not in ranks]
    if unknown:
        raise InvalidAdapter(f"unknown adapter(s) in the blend: {unknown}", code="unknown_adapter")
    bad = [(n, w) for n, w in spec.adapters if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT)]
    if bad:
        raise InvalidAdapter(f"blend weights must be finite numbers in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {bad}",
                             code="invalid_blend")
    if method.equal_ranks and len(names) > 1 and len({ranks[n] for n in names}) > 1:
        raise InvalidAdapter(
            f"combination_type {spec.combination_type!r} needs adapters of equal rank; got "
            + ", ".join(f"{n}: r={ranks[n]}" for n in names) + " (use 'cat' or 'svd' for mixed ranks)",
            code="rank_mismatch")
    if method.uses_density:
        if spec.density is None or not (0.0 < spec.density <= 1.0):
            raise InvalidAdapter(f"combination_type {spec.combination_type!r} needs density in (0, 1], "
                                 f"got {spec.density!r}", code="invalid_blend")


def check_blendable(spec: BlendSpec, variants: dict[str, tuple[str, ...]], what: str = "a blend") -> None:
    """Refuse sources whose variant PEFT's add_weighted_adapter does not combine: it blends only
    lora_A/lora_B, so a DoRA magnitude or a LoRA bias would be dropped or re-made, not blended."""
    odd = [(n, variants[n]) for n, _ in spec.adapters if variants.get(n)]
    if odd:
        name, kinds = odd[0]
        raise InvalidAdapter(f"{name!r} is a {'/'.join(kinds)} adapter: it is served alone, not as part of {what} "
                             "(PEFT's add_weighted_adapter blends only lora_A/lora_B)", code="unsupported_blend")


def build(peft_model: Any, name: str, spec: BlendSpec) -> None:
    """Add the blend to a PEFT model as adapter `name` (engine thread)."""
    import torch

    torch.manual_seed(0)  # the dare_* methods prune at random: same recipe, same blend
    kwargs: dict[str, Any] = {}
    if METHODS[spec.combination_type].uses_density:
        kwargs["density"] = spec.density
    try:
        peft_model.add_weighted_adapter(adapters=[n for n, _ in spec.adapters], weights=[w for _, w in spec.adapters],
                                        adapter_name=name, combination_type=spec.combination_type, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        if name in peft_model.peft_config:
            peft_model.delete_adapter(name)
        raise InvalidAdapter(f"PEFT could not build blend {name!r}: {e}", code="invalid_blend") from None


def write_folder(peft_model: Any, name: str, folder: Path) -> None:
    """Write adapter `name` of a PEFT model as a PEFT folder (safetensors + config)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in
               get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    peft_model.peft_config[name].save_pretrained(str(folder))
    assert (folder / CONFIG_FILE).is_file()


def blend_into_store(model_cfg: Any, cache_dir: Path, store: Path, name: str, parts: list[tuple[str, float]],
                     combination_type: str = "linear", density: float | None = None) -> Path:
    """Offline blend (`loraplex blend`): load the base and the named store adapters, build the blend
    with PEFT, and write it into the store as `<store>/<name>` (staging folder, then rename)."""
    import json
    import shutil

    from peft import PeftModel

    from ..atomic import publish, staging_path
    from ..model import load_model
    from .weights import describe_adapter

    store = Path(store)
    target = store / name
    if target.exists():
        raise InvalidAdapter(f"{target} already exists; choose another name", code="conflict")
    ranks = {n: describe_adapter(store / n).rank for n, _ in parts if (store / n / CONFIG_FILE).is_file()}
    spec = BlendSpec(tuple(parts), combination_type, density)
    check_spec(spec, ranks)
    loaded = load_model(model_cfg, cache_dir)
    (first, _), *rest = spec.adapters
    peft_model = PeftModel.from_pretrained(loaded.model, str(store / first), adapter_name=first)
    for n, _ in rest:
        peft_model.load_adapter(str(store / n), adapter_name=n)
    build(peft_model, name, spec)
    staging = staging_path(store / ".loraplex", name)
    try:
        write_folder(peft_model, name, staging)
        (staging / "blend.json").write_text(json.dumps({"name": name, **spec.recipe()}, indent=1))
        publish(staging, target, replace=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

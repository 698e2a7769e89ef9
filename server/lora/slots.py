"""Adapters by name in the slot pool: what may be loaded, how its weights map to layers, blends.

Owns: turning a validated PEFT folder (`weights.read_adapter`) into per-layer slot weights
(A (r, in), scale * B^T (r, out), with PEFT's own scaling: lora_alpha / r, / sqrt(r) with rsLoRA,
rank_pattern and alpha_pattern per module; scale * lora_B.bias for `lora_bias`; for DoRA the
per-output-row factor magnitude / ||W + scale * B A|| from the base's own weight, which is what
PEFT recomputes every forward), refusing what the slot path does not compute exactly
(a 422 naming the feature; the config itself is allow-listed before, by config_check.py),
name -> slot and identity, a host tier of recently evicted adapters
(their prepared tensors kept in RAM, so a reload skips the disk), and blends: PEFT's
`add_weighted_adapter` run on a workbench, a throw-away module tree whose leaves are the base
model's own linear layers, so that the serving model's tree is never touched.

It knows PEFT's file layout and config; it does not know requests or the engine's threads.
`prepare` and `build_blend` are pure (any thread). `install` may run while the engine runs a
forward: it writes into a free slot, which no token of any step reads, and the name appears in
`slot_of` only once the copy is complete (a request names an adapter only after its load
returned, so it never meets a half-written slot). `_lock` keeps installs and removals (the
engine thread, between steps) from choosing the same free slot or writing the pool at once.
"""

from __future__ import annotations

import copy
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidAdapter, Overloaded
from .pool import LoraPool
from .swap import prepare_swaps

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
                  r"|lora_magnitude_vector)$")
_PART = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias", "lora_magnitude_vector": "mag"}

@dataclass
class Prepared:
    """An adapter ready to copy into a slot: layer path -> (A (r, in), scale * B^T (r, out))."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    files: Any                      # the AdapterFiles (config + tensors) it came from, for blends
    bias: dict[str, torch.Tensor] = field(default_factory=dict)   # path -> scale * lora_B.bias (out,)
    mag: dict[str, torch.Tensor] = field(default_factory=dict)    # path -> DoRA's row factor (out,)
    copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # trained copies (swap.py)
    embedding: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # embedding LoRA


def _inside(module: str, layers: Any) -> bool:
    """Whether `module` is a child of a pool layer (its wrapped `.base`)."""
    head = module
    while "." in head:
        head = head.rsplit(".", 1)[0]
        if head in layers:
            return True
    return False


def _dora_factor(name: str, path: str, base: Any, a: torch.Tensor, b: torch.Tensor, scale: float,
                 magnitude: torch.Tensor) -> torch.Tensor:
    """magnitude / ||W + scale * B A|| per output row, W (out, in) as PEFT's DoRA layer sees it."""
    from peft.utils.integrations import dequantize_module_weight

    if base is None:
        raise InvalidAdapter(f"adapter {name!r}: DoRA needs the base layer {path}", code="unsupported_adapter")
    w = dequantize_module_weight(base).detach().float()
    if type(base).__name__ == "Conv1D":  # GPT-2 stores (in, out): PEFT's fan_in_fan_out transpose
        w = w.T
    norm = torch.linalg.norm(w + scale * (b.float() @ a.float()), dim=1)
    factor: torch.Tensor = magnitude.float() / norm
    return factor


def prepare(name: str, files: Any, pool: LoraPool, model_modules: set[str],
            base_of: Callable[[str], Any] | None = None) -> Prepared:
    """Map an adapter's tensors onto the pool's layers, with PEFT's per-module scaling.
    `base_of(path)`: the base's own layer at a pool path (DoRA's norms read its weight)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    config = files.config  # allow-listed by weights.read_adapter (config_check.py)

    def targeted(module: str) -> bool:
        # PEFT's "all-linear" (a hand-written config; PEFT saves the expanded names) is every linear
        # layer but the output head: the pool's layers exactly.
        if config.target_modules == "all-linear":
            return module in pool.layers
        return bool(check_target_module_exists(config, module))

    def rank_alpha(path: str) -> tuple[int, float]:
        r = int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)) \
            if config.rank_pattern else int(config.r)
        alpha = float(config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha)) \
            if config.alpha_pattern else float(config.lora_alpha)
        return r, alpha

    def scale_of(path: str) -> tuple[int, float]:
        r, alpha = rank_alpha(path)
        return r, alpha / math.sqrt(r) if config.use_rslora else alpha / r

    wrapped = set(pool.layers) | set(pool.swaps)
    originals = {m for m in model_modules if not _inside(m, wrapped)}  # the model's names, not our `.base`s
    parts: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in files.tensors.items():
        m = _KEY.match(key)
        path = m.group("module") if m else ""
        if m is None:
            rest[key] = t  # maybe a trained copy or embedding LoRA (swap.py); else refused there
            continue
        if path not in model_modules:
            raise InvalidAdapter(f"adapter {name!r}: tensor {key} targets {path}, which this base model lacks",
                                 code="wrong_base")
        if path not in pool.layers:
            raise InvalidAdapter(f"adapter {name!r}: LoRA on {path}, which is not a linear layer of the "
                                 "model's blocks (linear LoRA on the output head or a norm is not served)",
                                 code="unsupported_adapter")
        parts.setdefault(path, {})[_PART[m.group("part")]] = t
    swapped = prepare_swaps(name, config, rest, pool, originals, targeted, scale_of)
    if not parts and not swapped.copies and not swapped.embedding:
        raise InvalidAdapter(f"adapter {name!r}: none of its {len(files.tensors)} tensors matches a layer of this "
                             "base model", code="wrong_base")
    missing = [p for p in pool.layers if p not in parts and targeted(p)]
    if missing:  # PEFT would give such a layer its own initial weights: not what was trained
        raise InvalidAdapter(f"adapter {name!r}: {len(missing)} targeted layers have no weights in the file "
                             f"(first: {missing[0]})", code="invalid_weights")
    # The converse: weights for a layer the config does not target (layers_to_transform,
    # exclude_modules, target_modules) are ones PEFT never applies; serving them would differ.
    untargeted = [p for p in parts if not targeted(p)]
    if untargeted:
        raise InvalidAdapter(f"adapter {name!r}: the file holds weights for {len(untargeted)} layers its config does "
                             f"not target (first: {untargeted[0]}; see target_modules, layers_to_transform, "
                             "exclude_modules): PEFT would not apply them", code="invalid_weights")
    # A target outside the blocks' linear layers (lm_head, a norm; the embeddings without their LoRA
    # tensors) gets a LoRA layer from PEFT, initialised or refused by it: refused by name.
    outside = sorted(m for m in originals if m and m not in pool.layers and m not in swapped.embedding
                     and targeted(m))
    if outside:
        raise InvalidAdapter(f"adapter {name!r}: target_modules matches {outside[0]}"
                             f"{f' (and {len(outside) - 1} more)' if len(outside) > 1 else ''}, which is not a linear "
                             "layer of the model's blocks nor the input embeddings with their LoRA weights (LoRA on "
                             "the output head or norms is not served)", code="unsupported_adapter")
    # PEFT gives a layer of a lora_bias / DoRA config a bias / magnitude of its own making when the
    # file lacks one, and ignores one its config does not ask for: either way not what was trained.
    expect = {"A", "B"} | ({"bias"} if config.lora_bias else set()) | ({"mag"} if config.use_dora else set())
    what = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias (lora_bias)",
            "mag": "lora_magnitude_vector (DoRA)"}
    weights, biases, mags = {}, {}, {}
    for path, ab in parts.items():
        layer = pool.layers[path]
        if set(ab) != expect:
            odd = sorted(set(ab) ^ expect)[0]
            raise InvalidAdapter(f"adapter {name!r}: {path}: {what[odd]} is "
                                 f"{'missing' if odd in expect else 'in the file but not in its config'}",
                                 code="invalid_weights")
        r, alpha = rank_alpha(path)
        a, b = ab["A"], ab["B"]
        for part, t, want in (("A", a, (r, layer.fin)), ("B", b, (layer.fout, r))):
            if tuple(t.shape) != want:
                raise InvalidAdapter(
                    f"adapter {name!r}: {path}.lora_{part} has shape {tuple(t.shape)}, but {path} needs {want} "
                    f"(in {layer.fin}, out {layer.fout}, rank {r}); the adapter was made for another base model",
                    code="wrong_base")
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        wa, wb = a.float().contiguous(), (b.float() * scale).T.contiguous()
        # Finite in the dtype they are served in: float64's 1e300 is inf in float32, 1e5 in float16.
        for part, w in (("A", wa), ("B", wb)):
            if not bool(torch.isfinite(w.to(pool.dtype)).all()):
                raise InvalidAdapter(f"adapter {name!r}: {path}.lora_{part} (times its scale {scale:g}) holds NaN or "
                                     f"Inf in {str(pool.dtype).removeprefix('torch.')}", code="non_finite_weights")
        weights[path] = (wa, wb)
        vectors = {}
        if "bias" in ab:
            vectors["bias"] = biases[path] = ab["bias"].float() * scale
        if "mag" in ab:
            vectors["mag"] = mags[path] = _dora_factor(name, path, base_of(path) if base_of else None, a, b, scale,
                                                       ab["mag"])
        for part, v in vectors.items():
            if tuple(v.shape) != (layer.fout,):
                raise InvalidAdapter(f"adapter {name!r}: {path}: {what[part]} has shape {tuple(v.shape)}, but {path} "
                                     f"needs ({layer.fout},)", code="wrong_base")
            if not bool(torch.isfinite(v.to(pool.dtype)).all()):
                raise InvalidAdapter(f"adapter {name!r}: {path}: {what[part]} holds NaN or Inf as served "
                                     "(a zero-norm row makes DoRA's factor infinite)", code="non_finite_weights")
    return Prepared(weights, files, biases, mags, swapped.copies, swapped.embedding)


class AdapterSlots:
    def __init__(self, pool: LoraPool, model: nn.Module, host_capacity: int = 0):
        self.pool, self.model = pool, model
        self.host_capacity = host_capacity
        self.model_modules = {n for n, _ in model.named_modules()}
        self.slot_of: dict[str, int] = {}
        self.identity_of: dict[str, str] = {}
        self.loaded: dict[str, Prepared] = {}
        self._host: OrderedDict[Any, Prepared] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, name: str, files: Any) -> Prepared:
        return prepare(name, files, self.pool, self.model_modules, self.base_layer)

    def base_layer(self, path: str) -> nn.Module:
        """The base's own layer at a pool path (inside its SlotLinear)."""
        base = self.model.get_submodule(path).base
        assert isinstance(base, nn.Module)
        return base

    @property
    def names(self) -> set[str]:
        return set(self.slot_of)

    def free_slots(self) -> list[int]:
        used = set(self.slot_of.values())
        return [s for s in range(self.pool.slots) if s not in used]

    # -- host tier ---------------------------------------------------------------------------
    def from_host(self, key: Any) -> Prepared | None:
        return self._host.pop(key, None)

    def to_host(self, key: Any, prepared: Prepared) -> None:
        if self.host_capacity <= 0 or key is None:
            return
        self._host[key] = prepared
        while len(self._host) > self.host_capacity:
            self._host.popitem(last=False)

    # -- slots: install on the loader thread, remove on the engine thread; both under _lock ----
    def install(self, name: str, prepared: Prepared, identity: str) -> int:
        with self._lock:
            if name in self.slot_of:
                raise InvalidAdapter(f"adapter {name!r} is already loaded", code="adapter_exists")
            free = self.free_slots()
            if not free:
                raise Overloaded(f"all {self.pool.slots} LoRA slots are in use (adapters.max_loaded_adapters)",
                                 retry_after=1, code="adapter_capacity")
            slot = free[0]
            # A free slot: no step reads it while it is written.
            self.pool.write(slot, prepared.weights, prepared.bias, prepared.mag, prepared.copies, prepared.embedding)
            # Published last, each a single assignment: a reader sees the adapter whole or not at all.
            self.identity_of[name], self.loaded[name] = identity, prepared
            self.slot_of[name] = slot
        return slot

    def remove(self, name: str) -> tuple[str, Prepared] | None:
        with self._lock:
            slot = self.slot_of.pop(name, None)
            if slot is None:
                return None
            self.pool.clear(slot)
            return self.identity_of.pop(name), self.loaded.pop(name)

    def mix_slots(self, mix: tuple[tuple[str, float], ...]) -> tuple[tuple[int, float], ...]:
        """A per-request mix of loaded adapters as (slot, weight) pairs whose weighted sum of slot
        deltas is exactly PEFT's "cat" blend of them: cat stacks weight_i * scale_i * A_i with B_i
        (each slot's B already carries scale_i, so the slot counts weight_i times) and gives the
        blend lora_alpha = r = the sum of the ranks, so its own scale is 1, or sqrt(that sum)
        when the first adapter's config uses rsLoRA (the blend's config is a copy of the first's)."""
        configs = [self.loaded[n].files.config for n, _ in mix]
        factor = math.sqrt(sum(int(c.r) for c in configs)) if configs[0].use_rslora else 1.0
        return tuple((self.slot_of[n], float(w) * factor) for n, w in mix)

    # -- blends (any thread) -------------------------------------------------------------------
    def workbench(self) -> nn.Module:
        """A module tree with the model's paths whose leaves are the base's own linear layers
        (the modules the slots wrap): PEFT can inject into it without touching the model."""
        root = nn.Module()
        # PEFT records it in the blend's config (setattr: nn.Module types attributes as tensors or modules)
        setattr(root, "name_or_path", getattr(self.model, "name_or_path", None))  # noqa: B010
        for path in self.pool.layers:
            base = self.base_layer(path)
            node = root
            *parents, leaf = path.split(".")
            for p in parents:
                child = node._modules.get(p)
                if child is None:
                    child = nn.Module()
                    node.add_module(p, child)
                node = child
            node.add_module(leaf, base)
        return root

    def build_blend(self, name: str, spec: Any) -> Any:
        """PEFT's blend of loaded adapters, on a workbench; returns the PEFT model holding it."""
        from peft import get_peft_model, set_peft_model_state_dict

        from .blend import build

        missing = [n for n, _ in spec.adapters if n not in self.loaded]
        if missing:
            raise InvalidAdapter(f"blend {name!r}: adapters not in memory: {missing}", code="adapter_not_loaded")
        bench = self.workbench()
        peft = None
        for src, _ in spec.adapters:
            files = self.loaded[src].files
            cfg = copy.deepcopy(files.config)
            # The workbench's leaves are the base's own layers: PEFT must build the LoRA layers
            # without an initialisation that reads or writes them (the state dict replaces A and B).
            cfg.init_lora_weights = False
            # No task wrapper: PeftModelForCausalLM wants the generation hooks of a whole model,
            # and the workbench is bare layers (a trainer's adapter says CAUSAL_LM). The blend's
            # own config gets the first source's task type back below.
            cfg.task_type = None
            if peft is None:
                peft = get_peft_model(bench, cfg, adapter_name=src)
            else:
                peft.add_adapter(src, cfg)
            set_peft_model_state_dict(peft, files.tensors, adapter_name=src)
        assert peft is not None, "a blend has at least one source (blend.check_spec)"
        build(peft, name, spec)
        peft.peft_config[name].task_type = self.loaded[spec.adapters[0][0]].files.config.task_type
        return peft

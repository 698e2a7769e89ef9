"""The parts of a PEFT adapter that are not LoRA on a linear layer, served per row.

Owns `SlotModule`, a wrapper put once at start-up around the model's input embeddings, its output
head and its norms (the module tree never changes afterwards), and what it computes for the rows
of the slots that have something there:
- trained copies (`modules_to_save`): the rows of slot s are recomputed with s's own copy of the
  module (PEFT's ModulesToSaveWrapper runs the copy in place of the original: so does this);
- LoRA on the input embeddings (`lora_embedding_A/B`): y[t] += w * B_s^T @ A_s[:, id[t]] (scale in
  B), PEFT's `Embedding.forward`.
Rows are the step's flat tokens (`LoraBatch.segments`) everywhere but at the output head, whose
input is only the rows that sample (`LoraBatch.head_segments`). Other rows are never touched, so
one adapter's copy can change no other row. Slots with anything here run only in the packed step
(`LoraPool.packed_only`), never in a captured CUDA graph, whose fixed shapes cannot branch per slot.

`prepare_swaps` maps a PEFT file's tensors for these onto the wrapped modules, refusing (422) what
PEFT would compute otherwise. It knows modules, slots and PEFT's key names; never requests.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidAdapter

EMBED, HEAD, NORM = "embedding", "head", "norm"


def swappable(model: nn.Module) -> dict[str, str]:
    """Module path -> kind, for the modules a SlotModule wraps: embeddings, head, norms."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if m is emb:
            out[name] = EMBED
        elif m is head:
            out[name] = HEAD
        elif type(m).__name__.endswith("Norm") and not list(m.children()):
            out[name] = NORM
    return out


class SlotModule(nn.Module):
    def __init__(self, base: nn.Module, path: str, kind: str, pool: Any):
        super().__init__()
        self.base, self.path, self.kind = base, path, kind
        self._pool = [pool]                              # a list: not a submodule, not in state_dict
        self.copies: dict[int, nn.Module] = {}           # slot -> its trained copy of `base`
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A^T (vocab, r), scale * B^T (r, out))

    @property
    def weight(self) -> Any:
        """The base module's weight (what `get_output_embeddings().weight` callers read)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        batch = self._pool[0].batch
        if batch is None or not (self.copies or self.lora) or batch.token_slots is not None:
            return out  # the per-token (graph) path never carries these slots: see LoraPool.packed_only
        segs = batch.head_segments if self.kind == HEAD else batch.segments
        flat_in = x.reshape(-1) if self.kind == EMBED else x.reshape(-1, x.shape[-1])
        flat = out.view(-1, out.shape[-1])
        for slot, s, e, w in segs:
            if s == e:
                continue
            twin = self.copies.get(slot)
            if twin is not None:
                flat[s:e] = twin(flat_in[s:e]).to(flat.dtype)
            ab = self.lora.get(slot)
            if ab is not None:
                a, b = ab
                flat[s:e] += (F.embedding(flat_in[s:e], a) @ b).to(flat.dtype) * w
        return out

    def make_copy(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> nn.Module:
        """A copy of the base module holding `tensors` (its own parameter names) instead of its weights."""
        twin = copy.deepcopy(self.base)
        for name, t in tensors.items():
            owner, _, leaf = name.rpartition(".")
            mod = twin.get_submodule(owner) if owner else twin
            old = getattr(mod, leaf)
            setattr(mod, leaf, nn.Parameter(t.to(device=device, dtype=old.dtype if old.is_floating_point() else dtype),
                                            requires_grad=False))
        return twin.eval()


def wrap_swaps(model: nn.Module, pool: Any) -> dict[str, SlotModule]:
    """Wrap each swappable module of `model` in a SlotModule; path -> wrapper."""
    wrapped = {}
    for path, kind in swappable(model).items():
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        wrapped[path] = SlotModule(base, path, kind, pool)
        setattr(parent, child, wrapped[path])
    return wrapped


# -- from a PEFT file (any thread) ------------------------------------------------------------
_PREFIX = "base_model.model."
_EMB = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>[AB])$")


def _refuse(name: str, message: str, code: str = "unsupported_adapter") -> InvalidAdapter:
    return InvalidAdapter(f"adapter {name!r}: {message}", code=code)


def _finite(name: str, what: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(t.to(dtype)).all()):
        raise _refuse(name, f"{what} holds NaN or Inf in {str(dtype).removeprefix('torch.')}", "non_finite_weights")


@dataclass
class SwapParts:
    copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)        # path -> param -> tensor
    embedding: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # path -> (A^T, sB^T)


def prepare_swaps(name: str, config: Any, tensors: dict[str, torch.Tensor], pool: Any, originals: set[str],
                  targeted: Callable[[str], bool], scale_of: Callable[[str], tuple[int, float]]) -> SwapParts:
    """The slot contents of an adapter's tensors that are not linear-layer LoRA: trained copies
    (PEFT saves them under the module's own name) and LoRA on the input embeddings. Anything else,
    or anything PEFT would compute differently, is an InvalidAdapter naming it. `originals`: the
    model's own module names (PEFT matches modules_to_save against them with `endswith`);
    `scale_of(path)`: (rank, scale) as PEFT computes them for a module."""
    swaps: dict[str, SlotModule] = pool.swaps
    emb_path = next((p for p, sm in swaps.items() if sm.kind == EMBED), None)
    wanted = list(config.modules_to_save or [])
    copy_paths = sorted(p for p in originals if any(p.endswith(t) for t in wanted))
    for p in copy_paths:
        if p not in swaps:
            raise _refuse(name, f"modules_to_save matches {p}, which is not the input embeddings, the output head "
                                "or a norm (trained copies of other modules are not served)")
    if wanted and not copy_paths:
        raise _refuse(name, f"modules_to_save {wanted} matches no module of this base model", "wrong_base")
    if copy_paths and getattr(config, "ensure_weight_tying", False):
        raise _refuse(name, "ensure_weight_tying (trained copies tied to each other) is not served")
    out = SwapParts({p: {} for p in copy_paths})
    lora: dict[str, torch.Tensor] = {}
    saved_base = None
    for key, t in tensors.items():
        sub = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
        m = _EMB.match(sub) if sub else None
        if m and m.group("module") == emb_path:
            lora[m.group("part")] = t
            continue
        if sub and emb_path and sub == f"{emb_path}.base_layer.weight":
            saved_base = t  # PEFT's save_embedding_layers: the base's embeddings, saved beside their LoRA
            continue
        owner = max((p for p in copy_paths if sub and sub.startswith(p + ".")), key=len, default=None)
        if sub is None or owner is None:
            raise _refuse(name, f"tensor {key} is not a LoRA weight, bias or DoRA magnitude of a linear layer, LoRA on "
                                "the input embeddings, or a trained copy named by modules_to_save")
        out.copies[owner][sub[len(owner) + 1:]] = t
    for p in copy_paths:
        params = dict(swaps[p].base.named_parameters())
        got = out.copies[p]
        if set(got) != set(params):
            raise _refuse(name, f"the trained copy of {p} holds {sorted(got)}, but the module has {sorted(params)}",
                          "invalid_weights")
        for k, t in got.items():
            if tuple(t.shape) != tuple(params[k].shape):
                raise _refuse(name, f"the trained copy of {p}.{k} has shape {tuple(t.shape)}, but the base's is "
                                    f"{tuple(params[k].shape)}", "wrong_base")
            _finite(name, f"the trained copy of {p}.{k}", t, params[k].dtype)
    if lora:
        assert emb_path is not None
        out.embedding[emb_path] = _embedding_lora(name, config, lora, swaps[emb_path].base, emb_path, targeted,
                                                  scale_of, pool.dtype)
    if saved_base is not None:
        assert emb_path is not None
        base_w: torch.Tensor = swaps[emb_path].weight.detach()
        # PEFT loads this into the base model itself: served exactly only if it is the base's own
        # (to the resolution of the dtype it is served in).
        same = tuple(saved_base.shape) == tuple(base_w.shape) and (
            float((saved_base.float() - base_w.float()).abs().max())
            <= torch.finfo(base_w.dtype).eps * float(base_w.abs().max()))
        if not lora or not same:
            raise _refuse(name, f"the file holds its own {emb_path} weights (PEFT's save_embedding_layers) "
                                f"{'that differ from this base' if lora else 'without LoRA on them'}: PEFT would "
                                "load them into the base model, changing it for every request; refused", "wrong_base")
    return out


def _embedding_lora(name: str, config: Any, parts: dict[str, torch.Tensor], base: nn.Module, path: str,
                    targeted: Callable[[str], bool], scale_of: Callable[[str], tuple[int, float]],
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not targeted(path):
        raise _refuse(name, f"the file holds LoRA weights for {path}, which its config does not target",
                      "invalid_weights")
    if config.use_dora or config.lora_bias:
        raise _refuse(name, f"{'DoRA' if config.use_dora else 'lora_bias'} on the input embeddings is not served")
    if type(base) is not nn.Embedding or base.max_norm is not None:
        raise _refuse(name, f"LoRA on {path}, a {type(base).__name__} (scaled or renormed), is not served")
    if set(parts) != {"A", "B"}:
        raise _refuse(name, f"{path}: lora_embedding_{'A' if 'A' not in parts else 'B'} is missing", "invalid_weights")
    r, scale = scale_of(path)
    vocab, hidden = base.weight.shape
    a, b = parts["A"], parts["B"]
    for part, t, want in (("A", a, (r, vocab)), ("B", b, (hidden, r))):
        if tuple(t.shape) != want:
            raise _refuse(name, f"{path}.lora_embedding_{part} has shape {tuple(t.shape)}, but {path} needs {want}",
                          "wrong_base")
    at, bt = a.float().T.contiguous(), (b.float() * scale).T.contiguous()
    _finite(name, f"{path}.lora_embedding_A", at, dtype)
    _finite(name, f"{path}.lora_embedding_B (times its scale {scale:g})", bt, dtype)
    return at, bt

"""Every row's own LoRA delta in one batched product per layer.

Owns: the multi-adapter LoRA forward used by the engine. PEFT keeps the
adapters (loading, blends, fit checks) and its LoRA layers stay switched off,
so each of them computes only its base layer; a forward hook on each then adds
the deltas of the rows' adapters.

Semantics (the reference, `backend="loop"`):
    for each row i with adapter a(i) that targets this layer:
        y[i] += scale[a] * B[a] @ A[a] @ x[i]

Backends (a registry, so a GPU kernel can be added by name):
- "loop": the plain per-row loop above; slow, the oracle for the others.
- "dense": the adapters present in the batch are concatenated once per layer,
  A_cat (R, in) and B_cat (out, R) with the scales folded into B_cat, R the sum
  of their ranks; then y += ((x @ A_cat^T) * mask) @ B_cat^T, where mask (rows, R)
  keeps for each row only its own adapter's columns. Two matmuls per layer
  whatever the mix, so a mixed batch costs about what one adapter costs while R
  stays small; the cost grows with R, which is why the choice is per layer.
- "gathered": rows grouped by adapter into a padded block (n adapters, m rows,
  in) with one gather, then two batched matmuls against per-adapter stacks
  A (n, in, r_max) and B (n, r_max, out) (ranks zero-padded to r_max, scales
  folded in), then one index_add back. Punica's SGMV/BGMV idea in plain torch:
  each row meets only its own adapter (no 1/n wasted work as in "dense"), and
  the op count does not grow with n (unlike "segments"). Padding slots gather
  an all-zero row, so what they add back is exactly zero.
- "segments": rows grouped by adapter, two matmuls per adapter present; no
  wasted work, but the dispatch of many small matmuls dominates on CPU (1.7x
  slower than "dense" at R = 128, 8 x r16).
"auto" picks "dense" when one adapter targets the layer (nothing is wasted then)
and "gathered" when several do.

Shapes: x (rows, tokens, in), y (rows, tokens, out). Each backend adds into the
layer's output in place.

It knows PEFT's LoRA layer attributes (`lora_A`, `lora_B`, `scaling`), nothing else.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

BASE = "__base__"  # the row name for "no adapter" (PEFT's own word for it in adapter_names)


def _lora_layers(peft_model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


class BatchedLora:
    def __init__(self, peft_model: Any, backend: str = "auto"):
        if backend not in BACKENDS and backend != "auto":
            raise ValueError(f"unknown LoRA backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
        self.backend = backend
        self.rows: list[str] = []                  # adapter per row, BASE for none
        self._present: tuple[str, ...] = ()        # adapters in the batch, sorted
        self._row_index: dict[str, torch.Tensor] = {}
        self._cache: dict[int, tuple] = {}         # id(layer) -> (adapters, A_cat^T, B_cat^T, blocks)
        self._plans: dict[tuple, tuple] = {}       # (id(layer), adapters of the batch) -> (backend, targeted)
        self._masks: dict[tuple, torch.Tensor] = {}
        self._stacks: dict[int, tuple] = {}        # id(layer) -> (adapters, A stack, B stack)
        self._gathers: dict[tuple, tuple] = {}     # (adapters, tokens, device) -> (gather index, add-back index)
        self._handles = []
        self.attach(peft_model)

    def attach(self, peft_model: Any) -> None:
        """Hook every LoRA layer not hooked yet (new adapters may add layers)."""
        hooked = {id(h.module) for h in self._handles}
        for _, layer in _lora_layers(peft_model):
            if id(layer) not in hooked:
                handle = layer.register_forward_hook(self._hook)
                handle.module = layer
                self._handles.append(handle)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def set_rows(self, adapters: list[str]) -> None:
        """Call before each forward: the adapter of every row of the batch."""
        if adapters == self.rows:
            return
        self.rows = list(adapters)
        self._masks.clear()
        self._gathers.clear()
        if len(self._plans) > 4096:  # one entry per layer and batch mix: keep it bounded
            self._plans.clear()
        self._present = tuple(sorted(set(adapters) - {BASE}))
        self._row_index = {a: torch.tensor([i for i, r in enumerate(adapters) if r == a], dtype=torch.long)
                           for a in self._present}

    def forget(self) -> None:
        """Adapter weights changed (load, unload, blend): drop the concatenations and plans."""
        self._cache.clear()
        self._plans.clear()
        self._stacks.clear()

    # -- the hook --------------------------------------------------------------------
    def _hook(self, layer: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Add the rows' deltas to the base layer's output, in place (a fresh tensor of the layer's)."""
        if not self._row_index:
            return None
        plan = self._plan(layer)
        if plan is None:
            return None
        name, targeted = plan
        BACKENDS[name](self, layer, args[0], targeted, output)
        return None

    def _plan(self, layer: Any) -> tuple[str, list[str]] | None:
        """(backend, adapters of the batch that target this layer), cached per layer and batch mix."""
        key = (id(layer), self._present)
        hit = self._plans.get(key)
        if hit is None:
            targeted = tuple(a for a in self._present if a in layer.lora_A)  # hashable: a cache key as is
            if not targeted:
                hit = (None,)
            else:
                name = self.backend
                if name == "auto":
                    name = "dense" if len(targeted) == 1 else "gathered"
                hit = (name, targeted)
            self._plans[key] = hit
        return None if hit[0] is None else hit

    # -- helpers used by the backends ------------------------------------------------
    def concat(self, layer: Any, targeted: tuple[str, ...], dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
        """A_cat^T (in, R) and B_cat^T (R, out) with scales folded in, in the activations'
        dtype (PEFT keeps adapter weights in float32; a bfloat16 model computes its deltas in
        bfloat16, as vLLM does), and (adapter, rank) per block."""
        hit = self._cache.get(id(layer))
        if hit is not None and hit[0] == targeted and hit[1].dtype == dtype:
            return hit[1], hit[2], hit[3]
        a_t = torch.cat([layer.lora_A[a].weight for a in targeted], dim=0).to(dtype).T.contiguous()
        b_t = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in targeted], dim=1).to(dtype).T.contiguous()
        blocks = [(a, layer.lora_A[a].weight.shape[0]) for a in targeted]
        self._cache[id(layer)] = (targeted, a_t, b_t, blocks)
        return a_t, b_t, blocks

    def stacks(self, layer: Any, targeted: tuple[str, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A (n, in, r_max) and B (n, r_max, out), ranks zero-padded, scales folded into B."""
        hit = self._stacks.get(id(layer))
        if hit is not None and hit[0] == targeted and hit[1].dtype == dtype:
            return hit[1], hit[2]
        r_max = max(layer.lora_A[a].weight.shape[0] for a in targeted)
        a0, b0 = layer.lora_A[targeted[0]].weight, layer.lora_B[targeted[0]].weight
        a_st = a0.new_zeros(len(targeted), a0.shape[1], r_max, dtype=dtype)
        b_st = b0.new_zeros(len(targeted), r_max, b0.shape[0], dtype=dtype)
        for i, a in enumerate(targeted):
            r = layer.lora_A[a].weight.shape[0]
            a_st[i, :, :r] = layer.lora_A[a].weight.T.to(dtype)
            b_st[i, :r, :] = (layer.lora_B[a].weight * layer.scaling[a]).T.to(dtype)
        self._stacks[id(layer)] = (targeted, a_st, b_st)
        return a_st, b_st

    def gather_index(self, targeted: tuple[str, ...], tokens: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, int, bool, bool]:
        """Flat indexes over rows*tokens (+1 zero row at the end): (n*m*tokens,) to gather and to add
        back, m, whether any group is padded (else the zero row is not needed), and whether the
        gather is the identity (rows already grouped by adapter, in `targeted` order, equal groups:
        then the blocks are plain views). Group i holds the token rows of adapter targeted[i],
        padded to the largest group. Cached until the batch changes: every layer with the same
        adapters shares them."""
        key = (targeted, tokens, device)
        hit = self._gathers.get(key)
        if hit is None:
            groups = [[i for i, r in enumerate(self.rows) if r == a] for a in targeted]
            m = max(len(g) for g in groups)
            pad = len(self.rows) * tokens                      # the appended zero row
            gather, back = [], []
            for g in groups:
                for slot in range(m):
                    if slot < len(g):
                        span = range(g[slot] * tokens, (g[slot] + 1) * tokens)
                        gather.extend(span)
                        back.extend(span)
                    else:
                        gather.extend([pad] * tokens)
                        back.extend([0] * tokens)              # adds zeros: harmless anywhere
            padded = any(len(g) < m for g in groups)
            identity = not padded and gather == list(range(len(self.rows) * tokens))
            hit = (torch.tensor(gather, device=device), torch.tensor(back, device=device), m, padded, identity)
            self._gathers[key] = hit
        return hit

    def mask(self, blocks: list[tuple[str, int]], tokens: int, device: torch.device, dtype: torch.dtype
             ) -> torch.Tensor:
        """(rows * tokens, R): 1 where the column belongs to the row's adapter.
        Shared by every layer with the same blocks, until the batch changes."""
        key = (tuple(blocks), tokens, device, dtype)
        m = self._masks.get(key)
        if m is None:
            cols = []
            for a, r in blocks:
                own = torch.tensor([1.0 if row == a else 0.0 for row in self.rows], dtype=dtype)
                cols.append(own.unsqueeze(1).expand(len(self.rows), r))
            m = torch.cat(cols, dim=1).repeat_interleave(tokens, dim=0).contiguous().to(device)
            self._masks[key] = m
        return m


def _dense(bl: BatchedLora, layer: Any, x: torch.Tensor, targeted: tuple[str, ...], out: torch.Tensor) -> None:
    a_t, b_t, blocks = bl.concat(layer, targeted, x.dtype)
    x2 = x.reshape(-1, x.shape[-1])                          # (rows * tokens, in)
    xa = torch.mm(x2, a_t)                                   # (rows * tokens, R)
    xa.mul_(bl.mask(blocks, x.shape[1] if x.dim() == 3 else 1, xa.device, xa.dtype))
    out2 = out.view(-1, out.shape[-1])
    if out2.dtype == xa.dtype:
        out2.addmm_(xa, b_t)
    else:
        out2.add_(torch.mm(xa, b_t).to(out2.dtype))


def _gathered(bl: BatchedLora, layer: Any, x: torch.Tensor, targeted: tuple[str, ...], out: torch.Tensor) -> None:
    tokens = x.shape[1] if x.dim() == 3 else 1
    a_st, b_st = bl.stacks(layer, targeted, x.dtype)
    gather, back, m, padded, identity = bl.gather_index(targeted, tokens, x.device)
    n = len(targeted)
    out2 = out.view(-1, out.shape[-1])
    if identity and out2.dtype == x.dtype:
        # Rows already grouped by adapter (the engine orders joining rows so): two ops, no copies.
        blocks = out2.view(n, m * tokens, -1)
        blocks.baddbmm_(torch.bmm(x.reshape(n, m * tokens, -1), a_st), b_st)
        return
    x2 = x.reshape(-1, x.shape[-1])
    if padded:  # one op less per layer when every adapter has as many rows (decode at a balanced mix)
        x2 = torch.cat([x2, x2.new_zeros(1, x2.shape[1])])   # the zero row padding slots read
    xg = x2.index_select(0, gather).view(n, m * tokens, -1)   # (n, m * tokens, in)
    delta = torch.bmm(torch.bmm(xg, a_st), b_st)             # (n, m * tokens, out)
    out2.index_add_(0, back, delta.view(-1, delta.shape[-1]).to(out2.dtype))


def _segments(bl: BatchedLora, layer: Any, x: torch.Tensor, targeted: tuple[str, ...], out: torch.Tensor) -> None:
    for a in targeted:
        idx = bl._row_index[a].to(x.device)
        A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
        part = (x.index_select(0, idx).to(A.dtype) @ A.T) @ B.T * layer.scaling[a]
        out.index_add_(0, idx, part.to(out.dtype))


def _loop(bl: BatchedLora, layer: Any, x: torch.Tensor, targeted: tuple[str, ...], out: torch.Tensor) -> None:
    for i, a in enumerate(bl.rows):
        if a in targeted:
            A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
            out[i] += (layer.scaling[a] * (x[i].to(A.dtype) @ A.T @ B.T)).to(out.dtype)


BACKENDS: dict[str, Callable[[BatchedLora, Any, torch.Tensor, list[str], torch.Tensor], None]] = {
    "dense": _dense,
    "gathered": _gathered,
    "segments": _segments,
    "loop": _loop,
}

"""LoRA weights in fixed slots, selected per token: the multi-adapter forward of the engine.

Owns: the slot buffers and the layers that read them. At start-up every linear layer of the
model's blocks is wrapped once in a `SlotLinear` (the module tree never changes afterwards);
each targeted layer gets, on first use, stacked buffers in the compute dtype
    A: (slots + 1, r_cap, in)   B: (slots + 1, r_cap, out)   (scale folded into B; ranks zero-padded)
(the extra slot, index `slots`, is never written: the zero adapter of base rows on the per-token
path) and a rank per slot (0: this slot's adapter does not target the layer). Loading an adapter is one
copy into a free slot (everything of the slot is overwritten, so nothing of the adapter that had
it before can leak); unloading marks it free. `r_cap` grows (a one-off copy) when a higher rank
arrives.

Two per-slot vectors of the layer's outputs, allocated when the first adapter that needs them
arrives (`version` grows then too):
    bias: (slots + 1, out)  scale * lora_B.bias (PEFT's `lora_bias`), zeros elsewhere;
    mag:  (slots + 1, out)  DoRA's magnitude / ||W + scale * B A|| per output row (PEFT computes
                            the norm from the same fixed W and LoRA weights every forward), ones
                            elsewhere; a DoRA row's output is then mag * (W x + delta) + base bias,
                            which is PEFT's  base + (mag - 1) * W x + mag * delta  rearranged.

Per step the runner passes a `LoraBatch`: the step's tokens are ordered so that each slot's
tokens are contiguous, and `segments` lists (slot, start, end, weight) for the tokens with an
adapter. A per-request mix is several segments over the same tokens, one per source slot, each
with its weight (an ordinary adapter's weight is 1.0; a 3-tuple means that).
A static-shape decode step (CUDA graphs, `server/engine/graphs.py`) passes instead
`token_slots`, one slot index per token (the zero slot for the base): no Python-side layout,
so the step can be captured once and replayed. `version` grows whenever a buffer is replaced
(a new layer's first adapter, a rank increase), which is when a captured step must be redone.

Semantics (the reference, backend "loop"):
    for each segment (s, start, end, w) whose slot targets this layer, each token t in it:
        y[t] += w * B[s]^T @ (A[s] @ x[t])      (B already holds scale[s] * lora_B)
    then (`finish`, every backend) y[t] += w * bias[s], and for a DoRA slot
        y[t] = mag[s] * (y[t] - b) + b          (b: the base layer's own bias, if any)
Backends (a registry):
- "loop": the per-token loop above; slow, the oracle.
- "segments": two matmuls per segment, at the slot's own rank (Punica's SGMV in plain torch).
- "gathered": the segments padded into one block (n, m, in), two batched matmuls against the
  slots' stacked weights (n, r, in) / (n, r, out); when the segments are equal and contiguous the
  block is a plain view, else padding rows read zeros and their outputs are dropped, never added.
- per token (`token_slots`; not in the registry, it takes a tensor, not segments): each token's
  own slot's A and B gathered, two batched matrix-vector products (Punica's BGMV in plain torch).
"auto" takes "segments" for at most two segments, else "gathered". No backend ever multiplies a
token by another adapter's weights: a NaN or inf in one adapter reaches only its own tokens.

It knows shapes and slots; never requests, names or files (`server/lora/slots.py` maps those).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import LORA_BACKENDS
from .swap import SlotModule, wrap_swaps

LINEAR_TYPES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")


def features(module: Any) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None."""
    if type(module).__name__ == "Conv1D":  # GPT-2: weight stored (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if type(module).__name__ in LINEAR_TYPES and hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    return None


# (slot, first token, end token, weight) over the step's flat tokens.
Segment = tuple[int, int, int, float]
Backend = Callable[["PoolLayer", torch.Tensor, torch.Tensor, list[Segment], "LoraBatch"], None]


@dataclass
class LoraBatch:
    """One step's adapter layout: contiguous token ranges per slot."""

    segments: list[Segment]                 # slots >= 0, starts non-decreasing (the weight may be left out)
    tokens: int
    device: torch.device
    token_slots: torch.Tensor | None = None  # (T,) long, the per-token path: then segments are unused
    # The segments over the output head's input rows (only the rows that sample), for the slots'
    # trained copies of the head (`server/lora/swap.py`); empty when no slot has one.
    head_segments: list[Segment] = field(default_factory=list)
    _cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.segments = [seg if len(seg) == 4 else (*seg, 1.0) for seg in self.segments]

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Index tensors shared by every layer with the same targeted segments: built once per step."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build()
        return hit


class PoolLayer:
    """The slot buffers of one wrapped linear layer."""

    def __init__(self, path: str, fin: int, fout: int, slots: int):
        self.path, self.fin, self.fout = path, fin, fout
        self.rank = [0] * slots
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.has_bias = [False] * slots          # slot s adds bias[s]
        self.is_dora = [False] * slots           # slot s scales its rows by mag[s]
        self.bias: torch.Tensor | None = None    # (slots + 1, out)
        self.mag: torch.Tensor | None = None     # (slots + 1, out); ones where not DoRA
        self.dora_mask: torch.Tensor | None = None  # (slots + 1,) bool, for the per-token path
        self.base_bias: torch.Tensor | None = None  # the wrapped layer's own bias (out,), if any
        # (key, A_sel, B_sel) for "gathered", valid until a load
        self._sel: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), each (slots + 1, r_cap, in / out); allocated at the first write that targets the layer."""
        assert self.A is not None and self.B is not None, f"{self.path}: no slot holds weights for it"
        return self.A, self.B

    def targeted(self, segments: list[Segment]) -> list[Segment]:
        rank = self.rank
        return [seg for seg in segments if rank[seg[0]]]

    @property
    def extras(self) -> bool:
        """Whether any slot adds a bias or scales by DoRA here (else `finish` has nothing to do)."""
        return self.bias is not None or self.mag is not None


class SlotLinear(nn.Module):
    """A base linear layer plus the LoRA deltas of the step's slots."""

    def __init__(self, base: nn.Module, layer: PoolLayer, pool: LoraPool):
        super().__init__()
        self.base = base
        self.layer = layer
        self._pool = [pool]  # a list: not a submodule, not in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        batch = self._pool[0].batch
        if batch is None or self.layer.A is None:
            return out
        if batch.token_slots is not None:
            out2 = out.view(-1, out.shape[-1])
            self._pool[0].per_token(self.layer, x.reshape(-1, x.shape[-1]), out2, batch.token_slots)
            if self.layer.extras:
                self._pool[0].finish_per_token(self.layer, out2, batch.token_slots)
            return out
        if not batch.segments:
            return out
        segs = self.layer.targeted(batch.segments)
        if segs:
            pool = self._pool[0]
            x2 = x.reshape(-1, x.shape[-1])
            out2 = out.view(-1, out.shape[-1])
            pool.compute(pool.choose(segs), self.layer, x2, out2, segs, batch)
            if self.layer.extras:
                pool.finish(self.layer, out2, segs)
        return out


class LoraPool:
    def __init__(self, slots: int, dtype: torch.dtype, device: torch.device, backend: str = "auto"):
        if backend not in LORA_BACKENDS:  # the config's list, which names each of BACKENDS
            raise ValueError(f"unknown LoRA backend {backend!r}; valid: {', '.join(LORA_BACKENDS)}")
        self.slots, self.dtype, self.device, self.backend = slots, dtype, device, backend
        self.r_cap = 0
        self.version = 0                      # grows when any buffer is replaced (captured graphs go stale)
        self.layers: dict[str, PoolLayer] = {}
        self.swaps: dict[str, SlotModule] = {}  # embeddings, head, norms: trained copies, embedding LoRA
        self.packed_only: set[int] = set()      # slots with anything in `swaps`: never in a captured graph
        self.batch: LoraBatch | None = None   # set by the runner for the length of one forward

    # -- wrapping, once at start-up ------------------------------------------------------------
    def wrap(self, model: nn.Module, exclude: set[int]) -> None:
        """Wrap every linear-like module of `model` (except those whose id is in `exclude`) in a
        SlotLinear, then its embeddings, output head and norms in SlotModules."""
        targets = [(n, m, f) for n, m in model.named_modules()
                   if (f := features(m)) is not None and id(m) not in exclude]
        for name, module, (fin, fout) in targets:
            layer = PoolLayer(name, fin, fout, self.slots)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, SlotLinear(module, layer, self))
            bias = getattr(module, "bias", None)
            layer.base_bias = bias.detach() if isinstance(bias, torch.Tensor) else None
            self.layers[name] = layer
        self.swaps = wrap_swaps(model, self)

    # -- slots --------------------------------------------------------------------------------
    def _grow_rank(self, r: int) -> None:
        new = 1
        while new < r:
            new *= 2
        for layer in self.layers.values():
            if layer.A is not None:
                old_a, old_b = layer.buffers()
                A = old_a.new_zeros((self.slots + 1, new, layer.fin))
                B = old_b.new_zeros((self.slots + 1, new, layer.fout))
                A[:, :self.r_cap] = old_a
                B[:, :self.r_cap] = old_b
                layer.A, layer.B, layer._sel = A, B, None
        self.r_cap = new
        self.version += 1

    def write(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
              bias: dict[str, torch.Tensor] | None = None, mag: dict[str, torch.Tensor] | None = None,
              copies: dict[str, dict[str, torch.Tensor]] | None = None,
              embedding: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Put an adapter into `slot`: weights maps layer path -> (A (r, in), B_scaled (r, out));
        `bias` maps a path to its scaled LoRA bias (out,), `mag` to its DoRA scale (out,);
        `copies` a swappable module's path to its trained parameters, `embedding` the input
        embeddings' path to (A^T (vocab, r), B_scaled (r, out)).
        Every layer's part of the slot is overwritten (zeros where the adapter has nothing)."""
        self._write_vectors(slot, bias or {}, mag or {})
        self._write_swaps(slot, copies or {}, embedding or {})
        r_max = max((a.shape[0] for a, _ in weights.values()), default=0)
        if r_max > self.r_cap:
            self._grow_rank(r_max)
        for path, layer in self.layers.items():
            w = weights.get(path)
            if w is None:
                if layer.A is not None and layer.rank[slot]:
                    A, B = layer.buffers()
                    A[slot].zero_()
                    B[slot].zero_()
                    layer._sel = None
                layer.rank[slot] = 0
                continue
            a, b = w
            if layer.A is None:
                layer.A = torch.zeros((self.slots + 1, self.r_cap, layer.fin), dtype=self.dtype, device=self.device)
                layer.B = torch.zeros((self.slots + 1, self.r_cap, layer.fout), dtype=self.dtype, device=self.device)
                self.version += 1
            r = a.shape[0]
            A, B = layer.buffers()
            A[slot].zero_()
            B[slot].zero_()
            A[slot, :r] = a.to(device=self.device, dtype=self.dtype)
            B[slot, :r] = b.to(device=self.device, dtype=self.dtype)
            layer.rank[slot] = r
            layer._sel = None

    def _write_vectors(self, slot: int, bias: dict[str, torch.Tensor], mag: dict[str, torch.Tensor]) -> None:
        for path, layer in self.layers.items():
            b, g = bias.get(path), mag.get(path)
            if b is not None and layer.bias is None:
                layer.bias = torch.zeros((self.slots + 1, layer.fout), dtype=self.dtype, device=self.device)
                self.version += 1
            if g is not None and layer.mag is None:
                layer.mag = torch.ones((self.slots + 1, layer.fout), dtype=self.dtype, device=self.device)
                layer.dora_mask = torch.zeros(self.slots + 1, dtype=torch.bool, device=self.device)
                self.version += 1
            if layer.bias is not None:
                layer.bias[slot] = 0.0 if b is None else b.to(device=self.device, dtype=self.dtype)
            if layer.mag is not None and layer.dora_mask is not None:
                layer.mag[slot] = 1.0 if g is None else g.to(device=self.device, dtype=self.dtype)
                layer.dora_mask[slot] = g is not None
            layer.has_bias[slot], layer.is_dora[slot] = b is not None, g is not None

    def _write_swaps(self, slot: int, copies: dict[str, dict[str, torch.Tensor]],
                     embedding: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for path, sm in self.swaps.items():
            sm.copies.pop(slot, None)
            sm.lora.pop(slot, None)
            if path in copies:
                sm.copies[slot] = sm.make_copy(copies[path], self.dtype, self.device)
            if path in embedding:
                a, b = embedding[path]
                sm.lora[slot] = (a.to(device=self.device, dtype=self.dtype), b.to(device=self.device, dtype=self.dtype))
        # Published last: a graph step checks it (DecodeGraphs.fits) before it reads the slot.
        if copies or embedding:
            self.packed_only.add(slot)
        else:
            self.packed_only.discard(slot)

    def clear(self, slot: int) -> None:
        self.write(slot, {})

    @property
    def zero_slot(self) -> int:
        """The slot that stays zero: base rows' index on the per-token path."""
        return self.slots

    # -- compute ------------------------------------------------------------------------------
    def choose(self, segs: list[Segment]) -> str:
        if self.backend != "auto":
            return self.backend
        return "segments" if len(segs) <= 2 else "gathered"

    def compute(self, name: str, layer: PoolLayer, x2: torch.Tensor, out2: torch.Tensor,
                segs: list[Segment], batch: LoraBatch) -> None:
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if out2.dtype != self.dtype:  # accumulate in the pool's dtype, add back once
            delta = torch.zeros(out2.shape, dtype=self.dtype, device=out2.device)
            BACKENDS[name](layer, x2, delta, segs, batch)
            out2.add_(delta.to(out2.dtype))
        else:
            BACKENDS[name](layer, x2, out2, segs, batch)

    def finish(self, layer: PoolLayer, out2: torch.Tensor, segs: list[Segment]) -> None:
        """After the deltas: each segment's LoRA bias, then its DoRA scaling (see the module docstring)."""
        b0 = layer.base_bias
        for slot, s, e, w in segs:
            if layer.has_bias[slot] and layer.bias is not None:
                out2[s:e].add_(layer.bias[slot].to(out2.dtype), alpha=w)
            if layer.is_dora[slot] and layer.mag is not None:
                g = layer.mag[slot].to(out2.dtype)
                rows = out2[s:e]
                if b0 is None:
                    rows.mul_(g)
                else:
                    rows.sub_(b0).mul_(g).add_(b0)

    def finish_per_token(self, layer: PoolLayer, out2: torch.Tensor, token_slots: torch.Tensor) -> None:
        """`finish` for one slot index per token: fixed shapes, no host work, capturable."""
        if layer.bias is not None:
            out2.add_(layer.bias.index_select(0, token_slots).to(out2.dtype))
        if layer.mag is not None and layer.dora_mask is not None:
            g = layer.mag.index_select(0, token_slots).to(out2.dtype)
            b0 = layer.base_bias
            scaled = out2 * g if b0 is None else (out2 - b0) * g + b0
            # Rows of other slots are left bit for bit as they were (x * 1 is exact, (x - b) + b is not).
            out2.copy_(torch.where(layer.dora_mask.index_select(0, token_slots).unsqueeze(1), scaled, out2))

    def per_token(self, layer: PoolLayer, x2: torch.Tensor, out2: torch.Tensor, token_slots: torch.Tensor) -> None:
        """y[t] += B[s(t)]^T @ (A[s(t)] @ x[t]) for every token, at the full r_cap (zero-padded ranks
        add zeros; base tokens read the zero slot): fixed shapes, no host work, capturable."""
        A, B = layer.buffers()
        a = A.index_select(0, token_slots)                             # (T, r, in)
        b = B.index_select(0, token_slots)                             # (T, r, out)
        h = torch.bmm(a, x2.to(self.dtype).unsqueeze(-1))              # (T, r, 1)
        delta = torch.bmm(h.transpose(1, 2), b).squeeze(1)            # (T, out)
        out2.add_(delta.to(out2.dtype))


def _loop(layer: PoolLayer, x2: torch.Tensor, out2: torch.Tensor, segs: list[Segment], batch: LoraBatch) -> None:
    for slot, s, e, w in segs:
        r = layer.rank[slot]
        A, B = (buf[slot, :r] for buf in layer.buffers())
        for t in range(s, e):
            out2[t] += w * (B.T @ (A @ x2[t]))


def _segments(layer: PoolLayer, x2: torch.Tensor, out2: torch.Tensor, segs: list[Segment], batch: LoraBatch) -> None:
    A, B = layer.buffers()
    for slot, s, e, w in segs:
        r = layer.rank[slot]
        out2[s:e].addmm_(torch.mm(x2[s:e], A[slot, :r].T), B[slot, :r], alpha=w)


def _gathered(layer: PoolLayer, x2: torch.Tensor, out2: torch.Tensor, segs: list[Segment], batch: LoraBatch) -> None:
    key = tuple(segs)
    slots = tuple(seg[0] for seg in segs)
    r = max(layer.rank[s] for s in slots)
    sel = layer._sel
    if sel is None or sel[0] != (slots, r):
        A, B = layer.buffers()
        idx = torch.tensor(slots, dtype=torch.long, device=A.device)
        a_sel = A.index_select(0, idx)[:, :r].transpose(1, 2)         # (n, in, r)
        b_sel = B.index_select(0, idx)[:, :r].contiguous()            # (n, r, out)
        sel = layer._sel = ((slots, r), a_sel, b_sel)
    _, a_sel, b_sel = sel
    n = len(segs)
    lengths = [seg[2] - seg[1] for seg in segs]
    m = max(lengths)
    start = segs[0][1]
    contiguous = all(segs[i][2] == segs[i + 1][1] for i in range(n - 1))  # never true of a mix's overlaps
    weights = tuple(seg[3] for seg in segs)
    wt = None if all(w == 1.0 for w in weights) else batch.memo(
        ("w", weights), lambda: torch.tensor(weights, dtype=a_sel.dtype, device=x2.device).view(n, 1, 1))
    if contiguous and min(lengths) == m:
        xb = x2[start:start + n * m].view(n, m, -1)
        ob = out2[start:start + n * m].view(n, m, -1)
        h = torch.bmm(xb, a_sel)
        ob.baddbmm_(h if wt is None else h.mul_(wt), b_sel)
        return

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gather: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        pad = batch.tokens                      # index of the zero row appended below
        for i, (_, s, e, _w) in enumerate(segs):
            rows = list(range(s, e))
            gather += rows + [pad] * (m - len(rows))
            src += range(i * m, i * m + len(rows))
            dst += rows
        dev = x2.device
        return (torch.tensor(gather, device=dev), torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
    gather, src, dst = batch.memo(("g", key), build)
    xz = torch.cat([x2, x2.new_zeros((1, x2.shape[1]))])
    xb = xz.index_select(0, gather).view(n, m, -1)
    h = torch.bmm(xb, a_sel)
    delta = torch.bmm(h if wt is None else h.mul_(wt), b_sel).view(n * m, -1)
    out2.index_add_(0, dst, delta.index_select(0, src))  # padding rows' outputs are never added


BACKENDS: dict[str, Backend] = {"loop": _loop, "segments": _segments, "gathered": _gathered}

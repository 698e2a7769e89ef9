"""Attention over a paged KV cache, plugged into transformers' model classes.

Owns: the KV pool (one key and one value tensor per layer, (num_blocks * block_size, kv_heads,
head_dim), addressed by slot = block * block_size + offset), the per-step attention metadata
built from block tables, and the attention function transformers' layers call (registered
under the name "loraplex_paged" through `AttentionInterface`, as vLLM's transformers backend does).

A step's input is packed: one flat row of T tokens from many sequences, no padding. Each
layer's call writes the step's new keys and values into the pool at their slots, then every
query attends to its own sequence's slots up to and including its own position (and within a
sliding window, when the layer has one).

Backends (a registry; both take the same arguments):
- "reference": one SDPA per sequence over its gathered slots, with an explicit mask. Plain; the
  oracle in the tests.
- "batched": every single-token query (decodes) in one SDPA over a padded gather of their slots
  (padding masked out), each prompt chunk in its own SDPA. What the engine runs.

Shapes: query (1, heads, T, d), key/value (1, kv_heads, T, d) as transformers passes them; the
result (1, T, heads, d). It knows tensors and slots, nothing of requests, adapters or text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

NAME = "loraplex_paged"


class KVPool:
    def __init__(self, layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_slots, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @staticmethod
    def bytes_per_slot(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class SeqSpan:
    """One sequence's part of a step: its queries are tokens [start, start + length) of the flat
    batch, at positions [pos, pos + length); its keys are at `slots` (pos + length of them)."""

    start: int
    length: int
    pos: int
    slots: torch.Tensor             # (pos + length,) long


@dataclass
class AttnBatch:
    slot_mapping: torch.Tensor      # (T,) long: where each new token's key and value go
    spans: list[SeqSpan]
    device: torch.device
    _masks: dict = field(default_factory=dict)
    _decode: tuple | None = None

    def decode_gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[SeqSpan]]:
        """For the single-token spans: (their token rows (B,), slots (B, L) padded with 0, key
        positions (B, L) with -1 on padding, the other spans)."""
        if self._decode is None:
            single = [s for s in self.spans if s.length == 1]
            rest = [s for s in self.spans if s.length != 1]
            if single:
                width = max(s.pos + 1 for s in single)
                slots = torch.zeros((len(single), width), dtype=torch.long)
                kpos = torch.full((len(single), width), -1, dtype=torch.long)
                for i, s in enumerate(single):
                    slots[i, :s.pos + 1] = s.slots.cpu()
                    kpos[i, :s.pos + 1] = torch.arange(s.pos + 1)
                rows = torch.tensor([s.start for s in single], dtype=torch.long)
                qpos = torch.tensor([s.pos for s in single], dtype=torch.long)
                self._decode = (rows.to(self.device), slots.to(self.device), kpos.to(self.device),
                                qpos.to(self.device), rest)
            else:
                self._decode = (None, None, None, None, rest)
        return self._decode

    def mask(self, key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Masks are the same for every layer with the same window: built once per step."""
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = build()
        return m


def _visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., q, k) bool: key position visible from query position (causal, sliding window)."""
    ok = (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)) & (kpos.unsqueeze(-2) >= 0)
    if window:
        ok &= kpos.unsqueeze(-2) > qpos.unsqueeze(-1) - window
    return ok


def _span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: SeqSpan, batch: AttnBatch,
                    scaling: float, window: int | None, ck: Any) -> torch.Tensor:
    """One sequence: q (heads, length, d), k/v pool views (slots, kv_heads, d) -> (length, heads, d)."""
    keys = k.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)      # (1, kv_heads, L, d)
    vals = v.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)
    total = s.pos + s.length
    if s.pos == 0 and not (window and total > window):
        out = F.scaled_dot_product_attention(q.unsqueeze(0), keys, vals, is_causal=s.length > 1, scale=scaling,
                                             enable_gqa=True)
    else:
        def build() -> torch.Tensor:
            qpos = torch.arange(s.pos, total, device=batch.device)
            return _visible(qpos, torch.arange(total, device=batch.device), window)
        m = batch.mask((ck, id(s), window), build)
        out = F.scaled_dot_product_attention(q.unsqueeze(0), keys, vals, attn_mask=m, scale=scaling,
                                             enable_gqa=True)
    return out[0].transpose(0, 1)


def reference(q, k, v, batch: AttnBatch, scaling: float, window: int | None) -> torch.Tensor:
    """q (heads, T, d) -> (T, heads, d), one sequence at a time."""
    out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))
    for s in batch.spans:
        out[s.start:s.start + s.length] = _span_attention(q[:, s.start:s.start + s.length], k, v, s, batch,
                                                          scaling, window, "ref")
    return out


def batched(q, k, v, batch: AttnBatch, scaling: float, window: int | None) -> torch.Tensor:
    out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))
    rows, slots, kpos, qpos, rest = batch.decode_gather()
    if rows is not None:
        n, width = slots.shape
        flat = slots.reshape(-1)
        keys = k.index_select(0, flat).view(n, width, k.shape[1], k.shape[2]).transpose(1, 2)  # (B, kvh, L, d)
        vals = v.index_select(0, flat).view(n, width, v.shape[1], v.shape[2]).transpose(1, 2)
        m = batch.mask(("dec", window), lambda: _visible(qpos.unsqueeze(1), kpos, window).unsqueeze(1))
        qs = q.index_select(1, rows).transpose(0, 1).unsqueeze(2)                            # (B, heads, 1, d)
        o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=m, scale=scaling, enable_gqa=True)
        out[rows] = o[:, :, 0]
    for s in rest:
        out[s.start:s.start + s.length] = _span_attention(q[:, s.start:s.start + s.length], k, v, s, batch,
                                                          scaling, window, "bat")
    return out


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": reference, "batched": batched}


@dataclass
class StepContext:
    """What the attention function needs in one forward; passed as the `loraplex_step` keyword
    argument through the model's forward (transformers hands extra keywords to attention)."""

    pool: KVPool
    batch: AttnBatch
    backend: Callable[..., torch.Tensor]


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, *, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, loraplex_step: StepContext | None = None,
                    **_: Any) -> tuple[torch.Tensor, None]:
    if loraplex_step is None:
        raise RuntimeError("loraplex_paged attention called outside an engine step")
    ctx = loraplex_step
    layer = module.layer_idx
    k, v = ctx.pool.k[layer], ctx.pool.v[layer]
    # New keys and values into their slots: (1, kv_heads, T, d) -> (T, kv_heads, d).
    k.index_copy_(0, ctx.batch.slot_mapping, key[0].transpose(0, 1).to(k.dtype))
    v.index_copy_(0, ctx.batch.slot_mapping, value[0].transpose(0, 1).to(v.dtype))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ctx.backend(query[0], k, v, ctx.batch, scale, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Make "loraplex_paged" known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)

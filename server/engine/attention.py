"""Attention over a paged KV cache, plugged into transformers' model classes.

Owns: the KV pool (one key and one value tensor per layer, (kv_heads, num_blocks * block_size,
head_dim), addressed by slot = block * block_size + offset: heads outermost, so a gather of many
sequences' slots is one contiguous (kv_heads * sequences, length, head_dim) batch for bmm), the
per-step attention metadata built from block tables, and the attention function transformers' layers call (registered
under the name "loraplex_paged" through `AttentionInterface`, as vLLM's transformers backend does).

A step's input is packed: one flat row of T tokens from many sequences, no padding. Each
layer's call writes the step's new keys and values into the pool at their slots, then every
query attends to its own sequence's slots up to and including its own position (and within a
sliding window, when the layer has one).

Backends (a registry; both take the same arguments):
- "reference": one SDPA per sequence over its gathered slots, with an explicit mask. Plain; the
  oracle in the tests.
- "batched": every single-token query (decodes) in one pass over a padded gather of their slots
  (two batched matmuls and a softmax, padding masked out; the query heads of one KV head
  share its keys without repeating them), each prompt chunk in its own SDPA. What the engine runs.

Shapes: query (1, heads, T, d), key/value (1, kv_heads, T, d) as transformers passes them; the
result (1, T, heads, d). It knows tensors and slots, nothing of requests, adapters or text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "loraplex_paged"


class KVPool:
    def __init__(self, layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        # One slot more than the blocks hold: the last is never written and stays zero. Decode
        # padding reads it, never a freed slot whose stale values (NaN from a broken adapter,
        # say) would poison a masked-out score: -inf + NaN is NaN, and softmax spreads it.
        # And one more after it: `scratch_slot`, where the padding rows of a fixed-shape decode
        # step (CUDA graphs) write their keys; only those rows ever read it.
        self.pad_slot, self.scratch_slot = num_slots, num_slots + 1
        shape = (kv_heads, num_slots + 2, head_dim)
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


class _StepMemo:
    """Per-step index and mask tensors, built once and shared by every layer of the step."""

    _masks: dict[Any, torch.Tensor]

    def flat(self, slots: torch.Tensor, kv_heads: int, num_slots: int) -> torch.Tensor:
        """Rows of the pool viewed as (kv_heads * slots, d) for these slots, head by head: a gather
        along the first dimension of a 2-D tensor is a row copy (5x faster here than along dim 1)."""
        key = ("flat", id(slots), kv_heads, num_slots)
        hit = self._masks.get(key)
        if hit is None:
            heads = torch.arange(kv_heads, device=slots.device).unsqueeze(1) * num_slots
            hit = self._masks[key] = (slots.reshape(1, -1) + heads).reshape(-1)  # slots live as long as the batch
        return hit

    def mask(self, key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Masks are the same for every layer with the same window: built once per step."""
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = build()
        return m


@dataclass
class AttnBatch(_StepMemo):
    slot_mapping: torch.Tensor      # (T,) long: where each new token's key and value go
    spans: list[SeqSpan]
    device: torch.device
    pad_slot: int                   # the pool's never-written zero slot
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)
    _decode: tuple[Any, ...] | None = None

    def decode_gather(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                     torch.Tensor | None, list[SeqSpan]]:
        """For the single-token spans: (their token rows (B,), slots (B, L) padded with the pool's
        zero slot, key positions (B, L) with -1 on padding, query positions (B,), the other
        spans); the first four are None when no span is a single token."""
        if self._decode is None:
            single = [s for s in self.spans if s.length == 1]
            rest = [s for s in self.spans if s.length != 1]
            if single:
                width = max(s.pos + 1 for s in single)
                slots = torch.full((len(single), width), self.pad_slot, dtype=torch.long)
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


def _visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., q, k) bool: key position visible from query position (causal, sliding window)."""
    ok = (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)) & (kpos.unsqueeze(-2) >= 0)
    if window:
        ok &= kpos.unsqueeze(-2) > qpos.unsqueeze(-1) - window
    return ok


def _span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: SeqSpan, batch: AttnBatch,
                    scaling: float, window: int | None, ck: Any) -> torch.Tensor:
    """One sequence: q (heads, length, d), k/v pools (kv_heads, slots, d) -> (length, heads, d)."""
    kvh, n, d = k.shape
    idx = batch.flat(s.slots, kvh, n)
    keys = k.view(kvh * n, d).index_select(0, idx).view(1, kvh, -1, d)  # (1, kv_heads, L, d)
    vals = v.view(kvh * n, d).index_select(0, idx).view(1, kvh, -1, d)
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


def reference(q: Tensor, k: Tensor, v: Tensor, batch: AttnBatch, scaling: float, window: int | None) -> Tensor:
    """q (heads, T, d) -> (T, heads, d), one sequence at a time."""
    out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))
    for s in batch.spans:
        out[s.start:s.start + s.length] = _span_attention(q[:, s.start:s.start + s.length], k, v, s, batch,
                                                          scaling, window, "ref")
    return out


def _decode_rows(qr: Tensor, k: Tensor, v: Tensor, slots: Tensor, kpos: Tensor, qpos: Tensor, batch: _StepMemo,
                 scaling: float, window: int | None) -> Tensor:
    """B single-token queries qr (heads, B, d) over their padded key slots (B, L) (key positions
    kpos, -1 on padding; query positions qpos (B,)) -> (B, heads, d). Fixed shapes, no host work."""
    n, width = slots.shape
    kvh, total, d = k.shape
    rep = qr.shape[0] // kvh
    idx = batch.flat(slots, kvh, total)
    keys = k.view(kvh * total, d).index_select(0, idx).view(kvh * n, width, d)     # (kvh * B, L, d)
    vals = v.view(kvh * total, d).index_select(0, idx).view(kvh * n, width, d)
    # The query heads that share a KV head become that head's query rows (no repeat of K/V):
    # (heads, B, d) -> (kvh * B, rep, d), HF's head order (query head h reads KV head h // rep).
    qs = qr.reshape(kvh, rep, n, d).transpose(1, 2).reshape(kvh * n, rep, d)
    bias = batch.mask(("dec", window), lambda: torch.zeros(kpos.shape, dtype=qr.dtype, device=qr.device)
                      .masked_fill_(~_visible(qpos.unsqueeze(1), kpos, window)[:, 0], float("-inf"))
                      .view(1, n, 1, width).expand(kvh, n, 1, width).reshape(kvh * n, 1, width))
    scores = torch.baddbmm(bias, qs, keys.transpose(1, 2), alpha=scaling)             # (kvh * B, rep, L)
    o = torch.bmm(scores.softmax(-1), vals).view(kvh, n, rep, d)                      # (kvh, B, rep, d)
    return o.permute(1, 0, 2, 3).reshape(n, kvh * rep, d)


def batched(q: Tensor, k: Tensor, v: Tensor, batch: AttnBatch, scaling: float, window: int | None) -> Tensor:
    out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))
    rows, slots, kpos, qpos, rest = batch.decode_gather()
    if rows is not None:
        assert slots is not None and kpos is not None and qpos is not None
        out[rows] = _decode_rows(q.index_select(1, rows), k, v, slots, kpos, qpos, batch, scaling, window)
    for s in rest:
        out[s.start:s.start + s.length] = _span_attention(q[:, s.start:s.start + s.length], k, v, s, batch,
                                                          scaling, window, "bat")
    return out


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"reference": reference, "batched": batched}


@dataclass
class DecodeBatch(_StepMemo):
    """A decode-only step in fixed shapes, for CUDA-graph capture (`server/engine/graphs.py`):
    B rows, one token each, at most L key slots each. The tensors are the graph's static inputs,
    rewritten in place before every replay; rows past the real batch are padding (they write
    their key to a scratch slot and read only it)."""

    slot_mapping: torch.Tensor      # (B,) long
    slots: torch.Tensor             # (B, L) long, padded with the pool's zero slot
    kpos: torch.Tensor              # (B, L) long, -1 on padding
    qpos: torch.Tensor              # (B,) long
    _masks: dict[Any, torch.Tensor] = field(default_factory=dict)


def static_decode(q: Tensor, k: Tensor, v: Tensor, batch: DecodeBatch, scaling: float, window: int | None) -> Tensor:
    """The "batched" decode math over a DecodeBatch: every row of q (heads, B, d) is a decode."""
    return _decode_rows(q, k, v, batch.slots, batch.kpos, batch.qpos, batch, scaling, window)


@dataclass
class StepContext:
    """What the attention function needs in one forward; passed as the `loraplex_step` keyword
    argument through the model's forward (transformers hands extra keywords to attention)."""

    pool: KVPool
    batch: AttnBatch | DecodeBatch
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
    # New keys and values into their slots: (1, kv_heads, T, d) into (kv_heads, slots, d).
    kvh, n, d = k.shape
    idx = ctx.batch.flat(ctx.batch.slot_mapping, kvh, n)
    k.view(kvh * n, d).index_copy_(0, idx, key[0].reshape(-1, d).to(k.dtype))
    v.view(kvh * n, d).index_copy_(0, idx, value[0].reshape(-1, d).to(v.dtype))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ctx.backend(query[0], k, v, ctx.batch, scale, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Make "loraplex_paged" known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)

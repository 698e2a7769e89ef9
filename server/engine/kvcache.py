"""A KV cache that grows in place: a decode step writes one column instead of copying it all.

Owns: `GrowingCache`, a transformers `DynamicCache` whose layers keep keys and values in a
buffer with spare room along the sequence. transformers' `DynamicLayer.update` concatenates
the whole cache with the new token at every step (facts.md: 26% of an fp32 batch-32 step
here, growing with context); this layer writes into the spare room and hands back views.

The engine also edits the cache from outside (rows leave: `batch_select_indices`; rows join
or padding is trimmed: `keys`/`values` are assigned). A layer notices that its `keys` are no
longer a view of its buffer and adopts them, with fresh spare room, at the next update: one
copy per change of the batch, none per step.

Shapes: keys and values (batch, kv_heads, positions, head_dim).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

SPARE = 64  # positions of room added beyond what is needed, at least


class GrowingLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def _owned(self) -> bool:
        """Are `keys`/`values` still the views this layer handed out?"""
        k = self.keys
        return (self._kbuf is not None and k.data_ptr() == self._kbuf.data_ptr()
                and k.shape[0] == self._kbuf.shape[0] and k.shape[-2] == self._len)

    def _adopt(self, need: int) -> None:
        """New buffers with room for `need` positions, holding the current keys and values."""
        k, v = self.keys, self.values
        batch, heads, length, dim = k.shape
        cap = max(need + SPARE, int(need * 1.5))
        self._kbuf = k.new_empty((batch, heads, cap, dim))
        self._vbuf = v.new_empty((batch, heads, cap, v.shape[-1]))
        self._kbuf[:, :, :length] = k
        self._vbuf[:, :, :length] = v
        self._len = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self._adopt(key_states.shape[-2])
        else:
            n = key_states.shape[-2]
            if not self._owned() or self._len + n > self._kbuf.shape[-2]:
                self._adopt(self.keys.shape[-2] + n)
            self._kbuf[:, :, self._len:self._len + n] = key_states
            self._vbuf[:, :, self._len:self._len + n] = value_states
            self._len += n
        self.keys = self._kbuf[:, :, :self._len]
        self.values = self._vbuf[:, :, :self._len]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

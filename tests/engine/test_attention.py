"""Paged attention: the batched backend equals the per-sequence reference, and both equal plain
causal attention over each sequence alone (decodes, chunks that start mid-sequence, GQA, windows)."""

import pytest
import torch
import torch.nn.functional as F

from server.engine.attention import BACKENDS, AttnBatch, KVPool, SeqSpan


def plain(q, k, v, window=None):
    """q (heads, L, d), k/v (kv_heads, L, d) of one whole sequence: causal attention, last rows."""
    L = q.shape[1]
    i = torch.arange(L)
    ok = i[None, :] <= i[:, None]
    if window:
        ok &= i[None, :] > i[:, None] - window
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=ok, enable_gqa=True)[0]


@pytest.mark.parametrize("window", [None, 3])
def test_backends_equal_plain_attention(window):
    torch.manual_seed(0)
    heads, kvh, d, bs = 4, 2, 8, 4
    lengths = [9, 1, 6, 13]          # whole lengths; each sequence computes its last `new` tokens now
    new = [1, 1, 6, 5]               # two decodes, a first chunk, a chunk that starts at position 8
    pool = KVPool(1, 64, kvh, d, torch.float32, torch.device("cpu"))
    pool.k[0][:, :] = float("nan")   # stale values of freed slots (a broken adapter's, say) everywhere
    pool.v[0][:, :] = float("inf")
    pool.k[0][:, pool.pad_slot] = 0  # except the zero slot padding reads, which nothing ever writes
    pool.v[0][:, pool.pad_slot] = 0
    full = [(torch.randn(heads, n, d), torch.randn(kvh, n, d), torch.randn(kvh, n, d)) for n in lengths]
    spans, qs, t, next_block = [], [], 0, 0
    for (q, k, v), n, m in zip(full, lengths, new):
        blocks = list(range(next_block, next_block + -(-n // bs)))[::-1]   # scattered, reversed blocks
        next_block += len(blocks)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)])
        pool.k[0][:, slots] = k                                          # earlier steps and this call
        pool.v[0][:, slots] = v
        spans.append(SeqSpan(t, m, n - m, slots))
        qs.append(q[:, n - m:])
        t += m
    q_all = torch.cat(qs, dim=1)
    outs = {}
    for name, fn in BACKENDS.items():
        batch = AttnBatch(torch.zeros(t, dtype=torch.long), spans, torch.device("cpu"), pool.pad_slot)
        outs[name] = fn(q_all, pool.k[0], pool.v[0], batch, d ** -0.5, window)
    assert torch.isfinite(outs["batched"]).all() and torch.isfinite(outs["reference"]).all()
    assert torch.allclose(outs["batched"], outs["reference"], atol=1e-6)
    for s, (q, k, v), m in zip(spans, full, new):
        want = plain(q, k, v, window)[:, -m:].transpose(0, 1)
        assert torch.allclose(outs["batched"][s.start:s.start + m], want, atol=1e-5)

"""The in-place KV cache: the same tensors as transformers' DynamicCache, through joins and leaves."""

import torch
from transformers import DynamicCache

from server.engine.kvcache import GrowingCache


def feed(cache, steps):
    for i, (k, v) in enumerate(steps):
        out = cache.update(k, v, 0)
    return out


def test_same_as_dynamic_cache_over_many_steps():
    torch.manual_seed(0)
    steps = [(torch.randn(3, 2, 5 if i == 0 else 1, 4), torch.randn(3, 2, 5 if i == 0 else 1, 4)) for i in range(150)]
    ours, ref = feed(GrowingCache(), steps), feed(DynamicCache(), steps)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert ours[0].shape == (3, 2, 154, 4)


def test_outside_edits_are_adopted():
    torch.manual_seed(1)
    cache, ref = GrowingCache(), DynamicCache()
    for c in (cache, ref):
        c.update(torch.ones(3, 2, 4, 4), torch.ones(3, 2, 4, 4), 0)
    idx = torch.tensor([0, 2])
    for c in (cache, ref):
        c.batch_select_indices(idx)                       # a row leaves
        c.layers[0].keys = c.layers[0].keys[:, :, 1:]     # a padding column is trimmed
        c.layers[0].values = c.layers[0].values[:, :, 1:]
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    ours, theirs = cache.update(k, v, 0), ref.update(k, v, 0)
    assert torch.equal(ours[0], theirs[0]) and ours[0].shape == (2, 2, 4, 4)
    assert cache.get_seq_length() == ref.get_seq_length() == 4

"""The fixed-shape decode step (what CUDA graphs capture) equals the packed step, run eagerly on
the CPU: base and adapter rows, padding rows, every key-width bucket; padding writes only the
scratch slot. On a CPU the engine never takes this path (engine.cuda_graphs has no effect)."""

import pytest
import torch

from server.config import load_config
from server.engine.graphs import DecodeGraphs
from server.engine.runner import ModelRunner, StepItem
from server.lora.slots import prepare
from server.lora.weights import read_adapter
from server.model import load_model

BS = 4  # small blocks: the contexts below cross several width buckets (4, 8, 16, 32 keys)


@pytest.fixture(scope="module")
def runner(tiny_model_dir, tiny_store, tmp_path_factory):
    cfg = load_config(overrides={"model.model": str(tiny_model_dir), "model.dtype": "float32"})
    loaded = load_model(cfg.model, tmp_path_factory.mktemp("cache"))
    r = ModelRunner(loaded, slots=4, num_blocks=64, block_size=BS, cuda_graphs=True)
    for name in ("alpha", "beta"):
        r.slots.install(name, prepare(name, read_adapter(tiny_store / name, max_rank=64), r.pool,
                                      r.slots.model_modules), identity=name)
    return r


def test_cuda_graphs_change_nothing_on_a_cpu(runner):
    assert runner.graphs is None


def test_fixed_shape_decode_equals_the_packed_step(runner):
    graphs = DecodeGraphs(runner, max_rows=8, max_len=64, capture=False)
    slot = runner.slots.slot_of
    adapters = [None, "alpha", "beta", "alpha", None]
    lengths = [3, 9, 5, 14, 1]
    seqs, next_block = [], 0
    for i, (a, n) in enumerate(zip(adapters, lengths)):
        table = list(range(next_block, next_block + 8))  # room for 32 tokens
        next_block += 8
        prompt = [(11 * i + 5 * j + 1) % 200 for j in range(n)]
        first = int(runner.run_packed([StepItem(prompt, 0, table, slot[a] if a else -1)])[0].argmax())
        seqs.append({"table": table, "slot": slot[a] if a else -1, "tokens": prompt + [first]})
    widths = set()
    for step in range(16):
        live = seqs if step % 3 else seqs[:3]  # 5 rows (3 padding in the bucket of 8), then 3 (1 padding)
        items = [StepItem([s["tokens"][-1]], len(s["tokens"]) - 1, s["table"], s["slot"]) for s in live]
        packed = runner.run_packed(items)
        before = [k.clone() for k in runner.kv.k]
        fixed = graphs.run(items)
        widths.add(graphs._shape(items)[1])
        assert fixed.shape == packed.shape and torch.equal(fixed.argmax(-1), packed.argmax(-1))
        assert torch.allclose(fixed, packed, atol=1e-4, rtol=1e-5), (step, (fixed - packed).abs().max())
        # The packed step wrote these keys already; the fixed step rewrote them (equal up to
        # rounding: other matmul shapes) and its padding rows wrote only the scratch slot.
        own = {it.block_table[it.pos // BS] * BS + it.pos % BS for it in items}
        for k0, k1 in zip(before, runner.kv.k):
            changed = (k0 != k1).any(dim=2).any(dim=0).nonzero().flatten().tolist()
            assert set(changed) <= own | {runner.kv.scratch_slot}
            assert torch.allclose(k0[:, sorted(own)], k1[:, sorted(own)], atol=1e-4)
        for s, tok in zip(live, packed.argmax(-1).tolist()):
            s["tokens"].append(tok)
    assert widths >= {16, 32}, widths
    assert set(graphs._buckets) >= {(8, 16), (4, 16)}


def test_only_decode_only_steps_fit(runner):
    graphs = DecodeGraphs(runner, max_rows=4, max_len=32, capture=False)
    decode = StepItem([1], 5, [0, 1])
    assert graphs.fits([decode] * 4)
    assert not graphs.fits([decode] * 5)                       # more rows than the largest bucket
    assert not graphs.fits([decode, StepItem([1, 2], 5, [0, 1])])  # a prompt chunk
    assert not graphs.fits([StepItem([1], 40, list(range(11)))])   # a context past max_len
    assert not graphs.fits([StepItem([1], 5, [0, 1], sample=False)])


def test_a_failed_capture_falls_back_to_the_packed_step_for_good(runner, monkeypatch):
    graphs = DecodeGraphs(runner, max_rows=4, max_len=32, capture=False)
    graphs.capture = True  # as on CUDA, with a capture that raises (an op the model cannot capture)

    def boom(bucket):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "_capture", boom)
    table = list(range(40, 48))
    runner.run_packed([StepItem([5, 6, 7], 0, table)])
    step = [StepItem([8], 3, table)]
    want = runner.run_packed(step)
    got = graphs.run(step)
    assert torch.allclose(got, want, atol=1e-5)
    assert graphs.failed and not graphs.fits(step)

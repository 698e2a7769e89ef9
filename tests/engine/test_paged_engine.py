"""The paged engine core on a tiny Llama (fp32), against PEFT's own generate: prompts split into
chunks, prefix-cache hits, preemption under a small KV pool, loads and unloads while decoding."""

import asyncio

import pytest
import torch

from server.config import load_config
from server.engine.loop import TorchEngine
from server.engine.types import GenerationRequest, SamplingParams
from tests.helpers import save_adapter

# Long enough for three chunks of 4 tokens and two full 4-token blocks.
PROMPTS = ["the quick brown fox jumps over the lazy dog, hello world",
           "what is the capital of France? The capital of France is",
           "adapters change the output of the model; 0123456789"]


def start(model_dir, tmp, **engine):
    over = {"model.model": str(model_dir), "model.dtype": "float32", **{f"engine.{k}": v for k, v in engine.items()}}
    cfg = load_config(overrides=over)
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp, slots=4)
    eng.start()
    asyncio.run(eng.wait_ready())
    return eng


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_store):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    peft = PeftModel.from_pretrained(base, tiny_store / "alpha", adapter_name="alpha")
    peft.load_adapter(tiny_store / "beta", adapter_name="beta")
    cache = {}

    def generate(ids, adapter, n):
        key = (tuple(ids), adapter, n)
        if key not in cache:
            with torch.no_grad():
                if adapter is None:
                    with peft.disable_adapter():
                        out = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False)
                else:
                    peft.set_adapter(adapter)
                    out = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False)
            cache[key] = out[0, len(ids):].tolist()
        return cache[key]
    return generate


def req(eng, rid, prompt, adapter=None, n=10):
    return GenerationRequest(rid, eng.tokenizer.encode(prompt), SamplingParams(max_tokens=n, temperature=0.0,
                                                                               ignore_eos=True), adapter)


async def collect(eng, r):
    return [t async for ev in eng.submit(r) for t in ev.token_ids]


def run(eng, *requests):
    async def main():
        return await asyncio.gather(*(collect(eng, r) for r in requests))
    return asyncio.run(main())


@pytest.fixture(scope="module")
def chunked(tiny_model_dir, tiny_store, tmp_path_factory):
    """Budget 8 tokens a step, 3 prompt tokens per sequence per step: every prompt takes 3+ chunks."""
    eng = start(tiny_model_dir, tmp_path_factory.mktemp("c"), block_size=4, max_num_batched_tokens=8,
                max_prefill_chunk=3, max_batch_size=4)
    for name in ("alpha", "beta"):
        asyncio.run(eng.load_adapter(name, tiny_store / name))
    yield eng
    eng.shutdown()


def test_prompts_split_into_chunks_equal_peft(chunked, reference):
    reqs = [req(chunked, f"c{i}-{a}", p, a) for i, p in enumerate(PROMPTS) for a in (None, "alpha", "beta")]
    assert all(len(r.prompt_ids) >= 3 * 3 for r in reqs)
    outs = run(chunked, *reqs)
    for r, out in zip(reqs, outs):
        assert out == reference(r.prompt_ids, r.adapter, 10), (r.request_id, r.adapter)


def test_prefix_cache_hit_equals_a_miss_and_is_per_adapter(chunked, reference):
    prompt = "hello world, this is a tiny tokenizer for tests; the quick brown fox"  # not used elsewhere
    first = req(chunked, "p1", prompt, "alpha")
    [miss] = run(chunked, first)
    hits0 = chunked.stats().prefix_cache_hits
    [hit] = run(chunked, req(chunked, "p2", prompt, "alpha"))
    hits1 = chunked.stats().prefix_cache_hits
    assert hits1 - hits0 >= 8, "the second run should reuse at least two 4-token blocks"
    assert hit == miss == reference(first.prompt_ids, "alpha", 10)
    [other] = run(chunked, req(chunked, "p3", prompt, "beta"))   # same prompt, another adapter
    assert chunked.stats().prefix_cache_hits == hits1, "another adapter must never reuse alpha's blocks"
    assert other == reference(first.prompt_ids, "beta", 10)


def test_unloading_drops_the_adapters_cached_blocks(chunked, tiny_store):
    run(chunked, req(chunked, "u1", PROMPTS[1], "beta"))
    cached = chunked._blocks.cached_blocks
    asyncio.run(chunked.unload_adapter("beta"))
    assert chunked._blocks.cached_blocks < cached
    asyncio.run(chunked.load_adapter("beta", tiny_store / "beta"))  # back for the other tests (a host-tier hit)


def test_preemption_under_a_small_pool_gives_identical_tokens(tiny_model_dir, tiny_store, tmp_path, reference):
    # 12 blocks of 4 = 48 token positions; four sequences of ~16 prompt + 16 new tokens need ~128.
    eng = start(tiny_model_dir, tmp_path, block_size=4, max_kv_tokens=48, max_num_batched_tokens=64,
                max_prefill_chunk=64, max_batch_size=4)
    seen = []
    eng.on_step = lambda rows, secs: seen.append(eng._blocks.used_blocks)
    try:
        asyncio.run(eng.load_adapter("alpha", tiny_store / "alpha"))
        reqs = [req(eng, f"q{i}", PROMPTS[i % 3], "alpha" if i % 2 else None, n=16) for i in range(4)]
        outs = run(eng, *reqs)
        stats = eng.stats()
        assert stats.preemptions > 0
        assert stats.kv_cache_capacity_tokens == 48
        # (tokens + the zero slot + the scratch slot of CUDA-graph padding) x layers x kv heads x head dim
        assert sum(t.numel() for t in eng._runner.kv.k) == (48 + 2) * 2 * 2 * 16
        assert seen and max(seen) <= 12
        for r, out in zip(reqs, outs):
            assert out == reference(r.prompt_ids, r.adapter, 16), r.request_id
    finally:
        eng.shutdown()


def test_a_request_larger_than_the_pool_is_refused(tiny_model_dir, tmp_path):
    from server.errors import InvalidRequest

    eng = start(tiny_model_dir, tmp_path, block_size=4, max_kv_tokens=24, max_batch_size=4,
                max_num_batched_tokens=16)
    try:
        with pytest.raises(InvalidRequest, match="KV"):
            run(eng, req(eng, "big", PROMPTS[0], n=20))
    finally:
        eng.shutdown()


def test_loads_and_unloads_while_decoding_change_no_running_tokens(chunked, reference, tiny_model_dir, tmp_path):
    save_adapter(tiny_model_dir, tmp_path / "gamma", seed=9, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    reqs = [req(chunked, f"l{i}", PROMPTS[i % 3], (None, "alpha", "beta")[i % 3], n=30) for i in range(3)]

    async def main():
        tasks = [asyncio.create_task(collect(chunked, r)) for r in reqs]
        while not chunked.stats().running:
            await asyncio.sleep(0.001)
        for _k in range(4):  # a higher rank than anything loaded: the slot buffers grow mid-stream too
            await chunked.load_adapter("gamma", tmp_path / "gamma")
            await asyncio.sleep(0.005)
            await chunked.unload_adapter("gamma")
        return await asyncio.gather(*tasks)
    outs = asyncio.run(main())
    for r, out in zip(reqs, outs):
        assert out == reference(r.prompt_ids, r.adapter, 30), r.request_id

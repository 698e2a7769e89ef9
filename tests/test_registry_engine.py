"""The registry over the real engine (tiny Llama, fp32): blends equal PEFT's own, per-request mixes,
eviction churn and unloads while requests run keep every output exact."""

import asyncio
import shutil

import pytest
import torch

from server.config import load_config
from server.engine.loop import TorchEngine
from server.engine.types import GenerationRequest, SamplingParams
from server.lora.blend import BlendSpec
from server.registry import Registry
from tests.helpers import save_adapter

PROMPT = "the quick brown fox"
N = 10


@pytest.fixture(scope="module")
def template(tiny_model_dir, tiny_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("regeng") / "store"
    shutil.copytree(tiny_store, store)
    # gamma and delta say CAUSAL_LM, as the trainer's adapters do (a blend of them was a 500 once).
    save_adapter(tiny_model_dir, store / "gamma", seed=5, r=4, targets=("q_proj", "v_proj"), task_type="CAUSAL_LM")
    save_adapter(tiny_model_dir, store / "delta", seed=6, r=4, targets=("q_proj", "v_proj", "gate_proj"),
                 task_type="CAUSAL_LM")
    save_adapter(tiny_model_dir, store / "rs", seed=7, r=4, targets=("q_proj", "o_proj"), use_rslora=True)
    save_adapter(tiny_model_dir, store / "dora", seed=8, r=4, targets=("q_proj", "v_proj", "down_proj"), use_dora=True)
    save_adapter(tiny_model_dir, store / "biased", seed=9, r=2, targets=("k_proj", "up_proj"), lora_bias=True)
    save_adapter(tiny_model_dir, store / "saved", seed=10, r=2, targets=("q_proj",),
                 modules_to_save=["lm_head", "norm"])
    save_adapter(tiny_model_dir, store / "emb", seed=11, r=4, targets=("embed_tokens", "v_proj"))
    return store


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    cfg = load_config(overrides={"model.model": str(tiny_model_dir), "model.dtype": "float32"})
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path_factory.mktemp("cache"))
    eng.start()
    asyncio.run(eng.wait_ready())
    yield eng
    eng.shutdown()


@pytest.fixture
def fresh(engine, template, tmp_path):
    """A registry on a private store over the shared engine; the engine is emptied afterwards."""
    store = tmp_path / "store"
    shutil.copytree(template, store)

    def make(capacity=16):
        return Registry(engine, store, capacity=capacity)
    yield make
    for name in list(engine._runner.adapters):
        asyncio.run(engine.unload_adapter(name))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, template):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    peft = PeftModel.from_pretrained(base, template / "alpha", adapter_name="alpha")
    for name in ("beta", "gamma", "delta", "rs", "dora", "biased", "saved", "emb"):
        peft.load_adapter(template / name, adapter_name=name)
    peft.eval()

    def generate(ids, adapter=None, blend=None):
        if blend is not None:
            name, spec = blend
            if name not in peft.peft_config:
                torch.manual_seed(0)
                kw = {"density": spec.density} if spec.density is not None else {}
                peft.add_weighted_adapter([n for n, _ in spec.adapters], [w for _, w in spec.adapters], name,
                                          combination_type=spec.combination_type, **kw)
            adapter = name
        with torch.no_grad():
            peft.set_adapter(adapter)
            out = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()
    return generate


async def generate(engine, registry, model, mix=None, rid="r", n=N):
    lease = await registry.acquire(model, mix)
    try:
        req = GenerationRequest(rid, engine.tokenizer.encode(PROMPT),
                                SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), lease.adapter,
                                mix=lease.mix)
        return [t for ev in [e async for e in engine.submit(req)] for t in ev.token_ids]
    finally:
        registry.release(lease)


BLENDS = [
    BlendSpec((("alpha", 0.7), ("gamma", 0.3)), "linear"),
    BlendSpec((("alpha", 1.0), ("beta", -0.5)), "cat"),
    BlendSpec((("alpha", 0.5), ("beta", 0.5)), "svd"),
    BlendSpec((("alpha", 0.6), ("gamma", 0.6), ("delta", 0.4)), "ties", 0.5),
    BlendSpec((("gamma", 0.5), ("delta", 0.5)), "dare_linear", 0.7),
    BlendSpec((("alpha", 0.5), ("gamma", 0.5)), "magnitude_prune", 0.6),
]


@pytest.mark.parametrize("spec", BLENDS, ids=[b.combination_type for b in BLENDS])
def test_blend_equals_peft_add_weighted_adapter(engine, fresh, reference, spec):
    reg = fresh()
    name = f"blend-{spec.combination_type}"

    async def main():
        for src, _ in spec.adapters:
            await reg.register(src, src)
        await reg.create_blend(name, spec)
        return await generate(engine, reg, name)
    served = asyncio.run(main())
    ids = engine.tokenizer.encode(PROMPT)
    assert served == reference(ids, blend=(f"ref-{spec.combination_type}", spec))
    assert served != reference(ids, adapter=spec.adapters[0][0])


MIXES = [(("alpha", 0.7), ("beta", 0.3)),
         (("rs", 0.8), ("gamma", -0.4)),            # rsLoRA first: PEFT's cat blend inherits it (scale sqrt(8))
         (("gamma", 0.5), ("rs", 1.5), ("beta", 0.5)),
         (("delta", 2.0),)]


def test_per_request_mixes_in_one_batch_equal_peft_cat(engine, fresh, reference):
    """Mixes are weighted sets of the sources' slots, no blend built: each row equals PEFT's own
    "cat" blend, in one batch with base and plain adapter rows beside them."""
    reg = fresh()

    async def main():
        for n in ("alpha", "beta", "gamma", "delta", "rs"):
            await reg.register(n, n)
        slots_before = dict(engine._runner.slots.slot_of)
        jobs = [generate(engine, reg, engine.model_id, list(m), rid=f"mix-{i}") for i, m in enumerate(MIXES)]
        jobs += [generate(engine, reg, engine.model_id, rid="base"), generate(engine, reg, "alpha", rid="alpha")]
        out = await asyncio.gather(*jobs)
        assert engine._runner.slots.slot_of == slots_before  # no slot was taken by a mix
        return out
    *served, base, alpha = asyncio.run(main())
    ids = engine.tokenizer.encode(PROMPT)
    for i, (m, got) in enumerate(zip(MIXES, served)):
        assert got == reference(ids, blend=(f"ref-mix-{i}", BlendSpec(m, "cat"))), m
    assert base != alpha
    assert alpha == reference(ids, adapter="alpha")
    assert len({tuple(s) for s in served}) == len(MIXES)


def test_eviction_churn_keeps_outputs_exact(engine, fresh):
    names = ["alpha", "beta", "gamma", "delta"]

    async def solo():
        reg = fresh(capacity=16)
        for n in names:
            await reg.register(n, n)
        out = {n: await generate(engine, reg, n, rid=f"solo-{n}") for n in names}
        for n in names:
            await reg.unregister(n)
        return out
    expected = asyncio.run(solo())
    assert len({tuple(v) for v in expected.values()}) == 4

    async def churn():
        reg = fresh(capacity=2)
        for n in names:
            await reg.register(n, n)          # only two stay in memory
        jobs = [generate(engine, reg, names[i % 4], rid=f"churn-{i}") for i in range(12)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        return reg, results
    reg, results = asyncio.run(churn())
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            assert type(r).__name__ == "Overloaded", r  # all slots busy: a clean 429, never a wrong answer
        else:
            assert r == expected[names[i % 4]]
    assert sum(not isinstance(r, Exception) for r in results) >= 6
    assert sum(e.loaded for e in reg._entries.values()) <= 2


def test_unload_while_eight_streams_run(engine, fresh):
    reg = fresh()

    async def main():
        await reg.register("alpha", "alpha")
        expected = await generate(engine, reg, "alpha", rid="ref", n=40)
        streams = [asyncio.create_task(generate(engine, reg, "alpha", rid=f"s{i}", n=40)) for i in range(8)]
        await asyncio.sleep(0.05)
        unload = asyncio.create_task(reg.unregister("alpha"))
        while any(x.name == "alpha" for x in reg.entries()):  # hidden once its state write lands
            await asyncio.sleep(0.001)
        with pytest.raises(Exception) as e:
            await reg.acquire("alpha")
        assert type(e.value).__name__ == "NotFound"
        outs = await asyncio.gather(*streams)
        await unload
        return expected, outs
    expected, outs = asyncio.run(main())
    assert all(o == expected for o in outs)
    assert "alpha" not in engine._runner.adapters


def test_blend_survives_eviction_and_restart(engine, fresh):
    spec = BlendSpec((("alpha", 0.7), ("gamma", 0.3)), "linear")

    async def first():
        reg = fresh(capacity=3)
        await reg.register("alpha", "alpha")
        await reg.register("gamma", "gamma")
        await reg.create_blend("b", spec)
        before = await generate(engine, reg, "b")
        await reg.register("beta", "beta")
        await reg.register("delta", "delta")   # evicts two LRU entries, among them the blend or its sources
        after_reload = await generate(engine, reg, "b")
        return reg, before, after_reload
    reg, before, after = asyncio.run(first())
    assert before == after
    for name in list(engine._runner.adapters):
        asyncio.run(engine.unload_adapter(name))

    async def restart():
        reg2 = Registry(engine, reg.store, capacity=3)
        await reg2.start()
        return await generate(engine, reg2, "b")
    assert asyncio.run(restart()) == before


def test_adapter_for_another_base_is_refused_without_trace(engine, fresh, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.errors import InvalidAdapter

    cfg = LlamaConfig(vocab_size=engine.tokenizer.vocab_size, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide-base")
    reg = fresh()
    save_adapter(tmp_path / "wide-base", reg.store / "wide")

    async def main():
        with pytest.raises(InvalidAdapter) as e:
            await reg.register("wide", "wide")
        assert e.value.code == "wrong_base" and "needs" in e.value.message
        assert reg.entries() == [] and "wide" not in engine._runner.adapters
        await reg.register("alpha", "alpha")            # and the next load works
    asyncio.run(main())


def test_adapter_missing_some_tensors_is_refused(engine, fresh):
    from safetensors.torch import load_file, save_file

    from server.errors import InvalidAdapter

    reg = fresh()
    shutil.copytree(reg.store / "alpha", reg.store / "partial")
    w = reg.store / "partial" / "adapter_model.safetensors"
    tensors = load_file(w)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, w)

    async def main():
        with pytest.raises(InvalidAdapter) as e:
            await reg.register("partial", "partial")
        assert e.value.code == "invalid_weights" and "missing" in e.value.message
        assert "partial" not in engine._runner.adapters
    asyncio.run(main())


def test_dora_and_lora_bias_adapters_in_one_batch_equal_peft(engine, fresh, reference):
    """Issue 14: DoRA's per-row magnitude and a LoRA bias, served per row beside a plain adapter and
    the base in the same steps, give PEFT's greedy tokens."""
    reg = fresh()
    ids = engine.tokenizer.encode(PROMPT)

    async def main():
        for name in ("dora", "biased", "alpha"):
            await reg.register(name, name)
        models = ["dora", "biased", "alpha", engine.model_id, "dora", "biased"]
        return await asyncio.gather(*(generate(engine, reg, m, rid=f"v{i}") for i, m in enumerate(models))), models
    outs, models = asyncio.run(main())
    for out, m in zip(outs, models):
        if m != engine.model_id:  # the base row is there to share the steps (base equality: test_engine)
            assert out == reference(ids, m), m
    assert outs[0] == outs[4] and outs[1] == outs[5] and len({tuple(o) for o in outs[:4]}) == 4


def test_dora_and_lora_bias_adapters_are_not_blended_or_mixed(engine, fresh):
    from server.errors import InvalidAdapter, InvalidRequest
    reg = fresh()

    async def main():
        for name in ("dora", "biased", "alpha"):
            await reg.register(name, name)
        listed = {e.name: e.info.variants for e in reg.entries()}
        assert listed["dora"] == ("DoRA",) and listed["biased"] == ("lora_bias",) and listed["alpha"] == ()
        for src in ("dora", "biased"):
            with pytest.raises(InvalidAdapter, match=f"'{src}' is a .* adapter: it is served alone") as e:
                await reg.create_blend("b", BlendSpec(((src, 0.5), ("alpha", 0.5)), "cat"))
            assert e.value.code == "unsupported_blend"
            with pytest.raises(InvalidRequest, match="per-request mix"):
                await reg.acquire(engine.model_id, [(src, 0.5), ("alpha", 0.5)])
    asyncio.run(main())


def test_trained_copies_and_embedding_lora_in_one_batch_equal_peft(engine, fresh, reference):
    """Issue 14: an adapter's own lm_head and norms (modules_to_save) and LoRA on the embeddings,
    per row beside a plain adapter and the base, give PEFT's greedy tokens; such rows leave the
    CUDA-graph path (the packed step serves them) and every other row is untouched."""
    reg = fresh()
    ids = engine.tokenizer.encode(PROMPT)

    async def main():
        for name in ("saved", "emb", "alpha"):
            await reg.register(name, name)
        base_alone = await generate(engine, reg, engine.model_id, rid="b0")
        models = ["saved", "emb", "alpha", engine.model_id, "saved", "emb"]
        outs = await asyncio.gather(*(generate(engine, reg, m, rid=f"w{i}") for i, m in enumerate(models)))
        return outs, models, base_alone
    outs, models, base_alone = asyncio.run(main())
    for out, m in zip(outs, models):
        assert out == (base_alone if m == engine.model_id else reference(ids, m)), m
    assert len({tuple(o) for o in outs[:4]}) == 4
    variants = {e.name: e.info.variants for e in reg.entries()}
    assert variants["saved"] == ("modules_to_save",) and variants["emb"] == ("embedding LoRA",)


def test_an_alias_keeps_the_old_version_served_exactly_beside_its_replacement(engine, fresh, reference):
    """Issue 14: alpha is replaced by beta's weights while an alias pins its first version; in one
    batch, the alias and alpha@v1 give alpha's PEFT tokens and alpha gives beta's: the engine holds
    both versions, never mixing their weights. Once the alias lets go, v1 leaves the engine."""
    reg = fresh()
    ids = engine.tokenizer.encode(PROMPT)

    async def main():
        await reg.register("alpha", "alpha")
        v1 = reg.get("alpha").version
        await reg.set_alias("prod", {"target": f"alpha@{v1}"})
        await reg.register("alpha", "beta", replace=True)
        models = ["prod", "alpha", f"alpha@{v1}", "prod", "alpha"]
        outs = await asyncio.gather(*(generate(engine, reg, m, rid=f"a{i}") for i, m in enumerate(models)))
        keys_before = set(engine._runner.adapters)
        await reg.set_alias("prod", {"target": "alpha"})
        await reg.set_alias("prod", {"target": "alpha"})  # unchanged: v1 is still the rollback target
        await reg.rollback_alias("prod")                    # back to v1 ...
        after_rollback = await generate(engine, reg, "prod", rid="rb")
        await reg.set_alias("prod", {"target": "alpha"})
        await reg.set_alias("prod", {"target": f"alpha@{reg.get('alpha').version}"})  # ... and two flips away
        await asyncio.sleep(0.05)
        return outs, keys_before, after_rollback, set(engine._runner.adapters)
    outs, keys_before, after_rollback, keys_after = asyncio.run(main())
    assert outs[0] == outs[2] == outs[3] == after_rollback == reference(ids, "alpha")
    assert outs[1] == outs[4] == reference(ids, "beta")
    assert {"alpha", "alpha~1"} <= keys_before and "alpha" not in keys_after and "alpha~1" in keys_after

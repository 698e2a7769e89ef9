"""Loading the base: sources, device and dtype choices with reasons, bitsandbytes, GGUF."""

import asyncio
from contextlib import contextmanager

import pytest
import torch

from server.config import ModelConfig, load_config
from server.engine.loop import TorchEngine
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import ConfigError, InvalidAdapter
from server.model import choose_device, choose_dtype, cpu_has_fast_bf16, load_model, resolve_source


def test_dtype_choice_has_a_reason(monkeypatch):
    cpu = torch.device("cpu")
    dtype, why = choose_dtype("auto", cpu, "none")
    assert dtype in (torch.float32, torch.bfloat16) and why
    # bitsandbytes computes in bf16 where the CPU multiplies bf16 fast (oneDNN), else in fp32
    assert isinstance(cpu_has_fast_bf16(), bool)
    monkeypatch.setattr("server.model.cpu_has_fast_bf16", lambda: True)
    assert choose_dtype("auto", cpu, "nf4")[0] == torch.bfloat16
    monkeypatch.setattr("server.model.cpu_has_fast_bf16", lambda: False)
    dtype, why = choose_dtype("auto", cpu, "nf4")
    assert dtype == torch.float32 and "bfloat16" in why
    assert choose_dtype("bfloat16", cpu, "nf4")[0] == torch.bfloat16   # what the configuration says wins
    assert choose_dtype("float16", cpu, "none") == (torch.float16, "set in the configuration")
    assert choose_device("auto")[0].type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(ConfigError, match="CUDA"):
        choose_device("cuda")


def test_sources(tiny_model_dir, tmp_path):
    assert resolve_source(ModelConfig(model=str(tiny_model_dir)), tmp_path) == (tiny_model_dir, "tiny-llama")
    assert resolve_source(ModelConfig(model=str(tiny_model_dir), id="mine"), tmp_path)[1] == "mine"
    with pytest.raises(ConfigError, match="config.json"):
        resolve_source(ModelConfig(model=str(tmp_path)), tmp_path)
    with pytest.raises(ConfigError, match="not 'default'"):
        resolve_source(ModelConfig(model=str(tmp_path / "nothing")), tmp_path)


def test_load_tiny_folder(tiny_model_dir, tmp_path):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32", attn_implementation="eager"),
                        tmp_path)
    assert loaded.model_id == "tiny-llama" and loaded.context_length == 256
    assert loaded.dtype == torch.float32 and loaded.eos_token_ids == [loaded.tokenizer.eos_token_id]
    assert loaded.model.config._attn_implementation == "eager"


def generate(engine, adapter, prompt="hello world", n=8):
    async def go():
        req = GenerationRequest(f"q-{adapter}", engine.tokenizer.encode(prompt),
                                SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), adapter)
        return [t for ev in [e async for e in engine.submit(req)] for t in ev.token_ids]
    return asyncio.run(go())


@contextmanager
def running_engine(model_dir, cache, **overrides):
    cfg = load_config(overrides={"model.model": str(model_dir), **overrides})
    engine = TorchEngine(cfg.model, cfg.engine, cache_dir=cache)
    engine.start()
    try:
        asyncio.run(engine.wait_ready())
        yield engine
    finally:
        engine.shutdown()


@pytest.mark.parametrize("quant,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_base_serves_with_adapters(tiny_model_dir, tiny_store, tmp_path, quant, layer):
    with running_engine(tiny_model_dir, tmp_path, **{"model.quantization": quant}) as engine:
        asyncio.run(engine.load_adapter("alpha", tiny_store / "alpha"))
        q_proj = engine._runner.model.model.layers[0].self_attn.q_proj
        assert type(q_proj.base).__name__ == layer  # the LoRA slots wrap the quantized layer
        base, tuned = generate(engine, None), generate(engine, "alpha")
        assert len(base) == len(tuned) == 8 and base != tuned


def test_a_loftq_adapter_on_a_base_it_was_not_made_for_is_served_with_a_warning(tiny_model_dir, tiny_store, tmp_path,
                                                                              caplog):
    import json
    import shutil

    folder = tmp_path / "lq"
    shutil.copytree(tiny_store / "alpha", folder)
    (folder / "training.json").write_text(json.dumps({"loftq": True, "base_quantization": "nf4"}))
    with running_engine(tiny_model_dir, tmp_path, **{"model.dtype": "float32"}) as engine, \
            caplog.at_level("WARNING", logger="loraplex.engine"):
        info = asyncio.run(engine.load_adapter("lq", folder))
        assert info.base_quantization == "nf4"
        assert any("lq" in r.message and "nf4" in r.message for r in caplog.records)
        caplog.clear()
        asyncio.run(engine.load_adapter("alpha", tiny_store / "alpha"))   # no card: nothing to say
        assert not caplog.records
        assert generate(engine, "lq") == generate(engine, "alpha")   # served as PEFT computes it all the same


def test_adapter_for_another_base_is_refused_without_trace(tiny_model_dir, tiny_store, tmp_path):
    from transformers import LlamaConfig

    from tests.helpers import save_adapter, save_tiny_model

    other = save_tiny_model(tmp_path / "other")
    # Same module names, other shapes: a LoRA made for a wider model.
    cfg = LlamaConfig.from_pretrained(other)
    cfg.hidden_size, cfg.intermediate_size = 96, 160
    cfg.save_pretrained(other)
    from transformers import LlamaForCausalLM
    LlamaForCausalLM(cfg).save_pretrained(other)
    save_adapter(other, tmp_path / "wide")

    with running_engine(tiny_model_dir, tmp_path, **{"model.dtype": "float32"}) as engine:
        before = generate(engine, None)
        with pytest.raises(InvalidAdapter) as e:
            asyncio.run(engine.load_adapter("wide", tmp_path / "wide"))
        assert e.value.code == "wrong_base"
        assert "wide" not in engine._runner.adapters
        assert generate(engine, None) == before
        asyncio.run(engine.load_adapter("alpha", tiny_store / "alpha"))  # the engine still takes good ones
        assert generate(engine, "alpha") != before


def test_unloading_the_last_adapter_leaves_the_slots_empty(tiny_model_dir, tiny_store, tmp_path):
    with running_engine(tiny_model_dir, tmp_path, **{"model.dtype": "float32"}) as engine:
        before = generate(engine, None)
        asyncio.run(engine.load_adapter("alpha", tiny_store / "alpha"))
        pool = engine._runner.pool
        assert any(any(layer.rank) for layer in pool.layers.values())
        asyncio.run(engine.unload_adapter("alpha"))
        assert engine._runner.adapters == set()
        assert not any(any(layer.rank) for layer in pool.layers.values())
        assert all(float(layer.A.abs().sum()) == 0 for layer in pool.layers.values() if layer.A is not None)
        assert generate(engine, None) == before


def test_self_check_passes_for_llama_and_refuses_a_broken_model(tiny_model_dir, tmp_path):
    from server.config import ModelConfig
    from server.engine.runner import ModelRunner
    from server.errors import ConfigError

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), dtype="float32"), tmp_path)
    runner = ModelRunner(loaded, slots=2, num_blocks=32, block_size=16)
    assert runner.self_check() < 1e-4

    # A model that ignores position ids and attention masks (as an unsupported architecture might)
    # answers a padded row differently: it must be refused, not served.
    real_forward = loaded.model.forward

    def careless(*args, attention_mask=None, position_ids=None, **kw):
        return real_forward(*args, **kw)
    loaded.model.forward = careless
    with pytest.raises(ConfigError, match="not supported"):
        runner.self_check()

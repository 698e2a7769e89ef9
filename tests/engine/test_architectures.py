"""GPT-2 (Conv1D projections, weights stored transposed) through the engine and the batched LoRA path."""

import asyncio

import pytest
import torch

from server.config import load_config
from server.engine.loop import TorchEngine
from server.engine.types import GenerationRequest, SamplingParams
from tests.helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                       initializer_range=0.3, eos_token_id=tok.eos_token_id,
                                       bos_token_id=tok.bos_token_id))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name, targets, seed in (("attn", ["c_attn"], 1), ("mlp", ["c_fc", "c_proj"], 2)):
        torch.manual_seed(seed)
        base = GPT2LMHeadModel.from_pretrained(root / "base")
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True,
                                               init_lora_weights=False))
        peft.save_pretrained(root / name)
    return root


def test_gpt2_greedy_equals_peft(gpt2, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    cfg = load_config(overrides={"model.model": str(gpt2 / "base"), "model.dtype": "float32"})
    engine = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path)
    engine.start()
    try:
        async def main():
            await engine.wait_ready()
            for name in ("attn", "mlp"):
                await engine.load_adapter(name, gpt2 / name)
            ids = engine.tokenizer.encode("the quick brown fox")

            async def one(rid, adapter):
                req = GenerationRequest(rid, ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                                        adapter)
                return [t for ev in [e async for e in engine.submit(req)] for t in ev.token_ids]
            return ids, await asyncio.gather(one("b", None), one("a", "attn"), one("m", "mlp"))
        ids, (base_out, attn_out, mlp_out) = asyncio.run(main())
    finally:
        engine.shutdown()

    ref_base = GPT2LMHeadModel.from_pretrained(gpt2 / "base").eval()
    ref_base.generation_config.eos_token_id = None
    ref = PeftModel.from_pretrained(ref_base, gpt2 / "attn", adapter_name="attn")
    ref.load_adapter(gpt2 / "mlp", adapter_name="mlp")

    def generate(adapter):
        with torch.no_grad():
            if adapter is None:
                with ref.disable_adapter():
                    out = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                       pad_token_id=0)
            else:
                ref.set_adapter(adapter)
                out = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()
    assert base_out == generate(None)
    assert attn_out == generate("attn")
    assert mlp_out == generate("mlp")
    assert len({tuple(base_out), tuple(attn_out), tuple(mlp_out)}) == 3


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_greedy_equal_peft(family, tmp_path):
    """Qwen2 (q/k/v biases) and Mistral with a sliding window shorter than the run: the paged
    attention's window mask must match transformers' own."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    cfg = Qwen2Config(**common) if family == "qwen2" else MistralConfig(**common, sliding_window=6)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")

    cfg = load_config(overrides={"model.model": str(tmp_path / "base"), "model.dtype": "float32",
                                 "engine.block_size": 4})
    engine = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path)
    engine.start()
    try:
        async def main():
            await engine.wait_ready()
            await engine.load_adapter("lora", tmp_path / "lora")
            ids = engine.tokenizer.encode("the quick brown fox jumps")

            async def one(rid, adapter):
                req = GenerationRequest(rid, ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                                        adapter)
                return [t for ev in [e async for e in engine.submit(req)] for t in ev.token_ids]
            return ids, await asyncio.gather(one("b", None), one("l", "lora"))
        ids, (base_out, lora_out) = asyncio.run(main())
    finally:
        engine.shutdown()

    ref_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ref_base.generation_config.eos_token_id = None
    ref = PeftModel.from_pretrained(ref_base, tmp_path / "lora").eval()
    with torch.no_grad():
        want_lora = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):]
        with ref.disable_adapter():
            want_base = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):]
    assert base_out == want_base.tolist()
    assert lora_out == want_lora.tolist()
    assert base_out != lora_out

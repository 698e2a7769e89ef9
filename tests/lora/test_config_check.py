"""The adapter-config allow-list (server/lora/config_check.py) and the numeric checks after it:
issue 15's findings 1, 2, 3 and 11, each a hostile folder refused with a 422 naming the problem,
and the base model unchanged, bit for bit, after every attempt and after a blend."""

import asyncio
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.errors import InvalidAdapter
from server.lora.config_check import check_raw_config
from server.lora.slots import prepare
from server.lora.weights import describe_adapter, read_adapter
from tests.helpers import tiny_llama
from tests.lora.test_slots import wrapped


def hostile(tiny_store, tmp_path, name, config=None, tensors=None, raw_text=None):
    dst = tmp_path / name
    shutil.copytree(tiny_store / "alpha", dst)
    cfg_path = dst / "adapter_config.json"
    if raw_text is not None:
        cfg_path.write_text(raw_text)
    elif config is not None:
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        save_file({k: tensors(k, v) for k, v in t.items()}, dst / "adapter_model.safetensors")
    return dst


FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
HOSTILE = {
    # finding 1: initialisations PEFT runs on the base's weights
    "init-olora": ({"init_lora_weights": "olora"}, None, "init_lora_weights"),
    "init-pissa": ({"init_lora_weights": "pissa"}, None, "init_lora_weights"),
    "init-pissa-niter": ({"init_lora_weights": "pissa_niter_4"}, None, "init_lora_weights"),
    "init-corda": ({"init_lora_weights": "corda"}, None, "init_lora_weights"),
    "init-loftq": ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, None, "init_lora_weights"),
    "layer-replication": ({"layer_replication": [[0, 1], [0, 1]]}, None, "layer_replication"),
    "trainable-tokens": ({"trainable_token_indices": [1, 2]}, None, "trainable_token_indices"),
    "bias-all": ({"bias": "all"}, None, "bias"),
    "modules-to-save-without-copy": ({"modules_to_save": ["lm_head"]}, None, "trained copy of lm_head holds []"),
    "modules-to-save-a-block": ({"modules_to_save": ["mlp"]}, None, "not the input embeddings, the output head"),
    "target-parameters": ({"target_parameters": ["model.layers.0.mlp.up_proj.weight"]}, None, "target_parameters"),
    "unknown-field": ({"use_magic": True}, None, "use_magic"),
    # finding 2: numbers that are not finite
    "alpha-nan": ({"lora_alpha": float("nan")}, None, "lora_alpha"),
    "alpha-inf": ({"lora_alpha": float("inf")}, None, "lora_alpha"),
    "alpha-pattern-nan": ({"alpha_pattern": {"q_proj": float("nan")}}, None, "alpha_pattern"),
    "float64-1e300": (None, lambda k, v: v.double() * 1e300 if k == FIRST_A else v, "NaN or Inf"),
    # finding 3: ranks past the cap through rank_pattern, non-float tensors
    "rank-pattern-2048": ({"rank_pattern": {"q_proj": 2048}}, None, "rank 2048 exceeds"),
    "int8-tensors": (None, lambda k, v: (v * 100).to(torch.int8), "int8"),
    "bool-tensors": (None, lambda k, v: v > 0, "bool"),
    "r-string": ({"r": "8"}, None, "r"),
    "r-bool": ({"r": True}, None, "r"),
    # red-team pass 2: configs that PEFT reads differently from the file's tensors
    "layers-to-transform": ({"layers_to_transform": [0]}, None, "does not target"),
    "exclude-modules": ({"exclude_modules": ["q_proj"]}, None, "does not target"),
    "target-lm-head": ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, None, "lm_head"),
    "target-embed": ({"target_modules": ["q_proj", "v_proj", "embed_tokens"]}, None, "embed_tokens"),
    "target-norm": ({"target_modules": ["q_proj", "v_proj", "norm"]}, None, "norm"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_issue15_findings_1_2_3_hostile_configs_are_refused_naming_the_field(tiny_store, tmp_path, name):
    config, tensors, needle = HOSTILE[name]
    folder = hostile(tiny_store, tmp_path, name, config, tensors)
    pool, modules = wrapped(tiny_llama(400))
    with pytest.raises(InvalidAdapter) as e:
        files = read_adapter(folder, max_rank=64)
        prepare(name, files, pool, modules)  # the numeric checks happen in the served dtype
    assert needle in e.value.message, e.value.message
    assert e.value.code in ("unsupported_adapter", "rank_too_high", "invalid_weights", "non_finite_weights",
                            "invalid_config")


@pytest.mark.parametrize("text", ["[]", '"x"', '{"r": 1e400}', "[" * 100000 + "]" * 100000, "{" * 50])
def test_issue15_finding11_configs_that_crashed_are_invalid_adapters(tiny_store, tmp_path, text):
    folder = hostile(tiny_store, tmp_path, "bad", raw_text=text)
    for read in (lambda: read_adapter(folder, max_rank=64), lambda: describe_adapter(folder)):
        with pytest.raises(InvalidAdapter):
            read()


def test_the_allow_list_accepts_what_peft_writes(tiny_store):
    raw = json.loads((tiny_store / "alpha" / "adapter_config.json").read_text())
    check_raw_config(raw, max_rank=64)
    check_raw_config({**raw, "init_lora_weights": "gaussian", "use_rslora": True, "rank_pattern": {"q_proj": 8},
                      "alpha_pattern": {"v_proj": 3.5}, "lora_dropout": 0.1}, max_rank=64)


def test_issue15_finding1_the_base_is_unchanged_after_every_hostile_load_and_a_blend(tiny_model_dir, tiny_store,
                                                                                      tmp_path):
    """The real engine: each hostile folder refused, and a blend built with PEFT on the workbench;
    the base model's logits stay bit for bit what a fresh engine gives."""
    from server.config import load_config
    from server.engine.loop import TorchEngine
    from server.engine.types import GenerationRequest, SamplingParams
    from server.lora.blend import BlendSpec

    cfg = load_config(overrides={"model.model": str(tiny_model_dir), "model.dtype": "float32"})
    folders = {n: hostile(tiny_store, tmp_path, n, c, t) for n, (c, t, _) in HOSTILE.items()}

    def base_logprobs(eng):
        async def go():
            r = GenerationRequest("probe", eng.tokenizer.encode("hello world, the quick brown fox"),
                                  SamplingParams(max_tokens=0, prompt_logprobs=0))
            return [ev async for ev in eng.submit(r)][0].prompt_logprobs
        return [lp.logprob for lp in asyncio.run(go())]

    fresh = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path / "c1")
    fresh.start()
    asyncio.run(fresh.wait_ready())
    want = base_logprobs(fresh)
    fresh.shutdown()

    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path / "c2")
    eng.start()

    async def attack():
        await eng.wait_ready()
        for name, folder in folders.items():
            with pytest.raises(InvalidAdapter):
                await eng.load_adapter(name, folder)
        await eng.load_adapter("alpha", tiny_store / "alpha")
        await eng.load_adapter("beta", tiny_store / "beta")
        await eng.create_blend("ab", BlendSpec((("alpha", 0.6), ("beta", 0.4)), "cat"), tmp_path / "blend")
    try:
        asyncio.run(attack())
        assert base_logprobs(eng) == want  # bit for bit
    finally:
        eng.shutdown()

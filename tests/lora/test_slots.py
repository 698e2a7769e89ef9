"""Adapter files onto LoRA slots: shape checks (Linear and GPT-2's Conv1D), refused features, PEFT's scaling."""

import pytest
import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel

from server.errors import InvalidAdapter
from server.lora.pool import LoraPool
from server.lora.slots import prepare
from server.lora.weights import AdapterFiles, AdapterInfo
from tests.helpers import tiny_llama

P = "base_model.model."


def wrapped(model):
    pool = LoraPool(2, torch.float32, torch.device("cpu"))
    modules = {n for n, _ in model.named_modules()}
    pool.wrap(model, exclude={id(model.get_output_embeddings())})
    return pool, modules


def files(tensors, **cfg):
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **cfg})
    return AdapterFiles(AdapterInfo(None, config.r, config.lora_alpha, (), "", 0), config, tensors)


def test_llama_shapes_and_scaling():
    pool, modules = wrapped(tiny_llama(100))
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    ok = {P + "model.layers.0.self_attn.q_proj.lora_A.weight": a,
          P + "model.layers.0.self_attn.q_proj.lora_B.weight": b,
          P + "model.layers.1.self_attn.q_proj.lora_A.weight": a,
          P + "model.layers.1.self_attn.q_proj.lora_B.weight": b}
    prep = prepare("a", files(ok), pool, modules)
    pa, pb = prep.weights["model.layers.0.self_attn.q_proj"]
    assert torch.equal(pa, a) and torch.allclose(pb, (b * 2.0).T)  # alpha / r = 2
    rs = prepare("a", files(ok, use_rslora=True), pool, modules).weights["model.layers.0.self_attn.q_proj"][1]
    assert torch.allclose(rs, (b * 8 / 2).T)  # alpha / sqrt(r)
    bad = dict(ok)
    bad[P + "model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(96, 4)
    with pytest.raises(InvalidAdapter, match=r"needs \(64, 4\)") as e:
        prepare("a", files(bad), pool, modules)
    assert e.value.code == "wrong_base"


def test_rank_and_alpha_patterns_follow_peft():
    pool, modules = wrapped(tiny_llama(100))
    t = {}
    for layer, r in ((0, 2), (1, 4)):
        t[P + f"model.layers.{layer}.self_attn.q_proj.lora_A.weight"] = torch.ones(r, 64)
        t[P + f"model.layers.{layer}.self_attn.q_proj.lora_B.weight"] = torch.ones(64, r)
    prep = prepare("p", files(t, rank_pattern={"layers.0.self_attn.q_proj": 2},
                              alpha_pattern={"layers.0.self_attn.q_proj": 6}), pool, modules)
    assert float(prep.weights["model.layers.0.self_attn.q_proj"][1][0, 0]) == 3.0   # 6 / 2
    assert float(prep.weights["model.layers.1.self_attn.q_proj"][1][0, 0]) == 2.0   # 8 / 4


def test_gpt2_conv1d_is_transposed():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=64))
    pool, modules = wrapped(model)
    ok = {P + "transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32),
          P + "transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2)}  # c_attn: in 32, out 96
    prepare("g", files(ok, r=2, target_modules=["c_attn"]), pool, modules)
    with pytest.raises(InvalidAdapter):
        prepare("g", files({P + "transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 96),
                            P + "transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2)},
                           r=2, target_modules=["c_attn"]), pool, modules)


@pytest.mark.parametrize("tensors,match,code", [
    ({P + "model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}, "lacks", "wrong_base"),
    ({"something.else": torch.zeros(1)}, "not a LoRA weight, bias or DoRA magnitude", "unsupported_adapter"),
    ({P + "model.norm.lora_A.weight": torch.zeros(4, 64)}, "not a linear layer", "unsupported_adapter"),
    ({P + "lm_head.lora_A.weight": torch.zeros(4, 64)}, "output head", "unsupported_adapter"),
    ({P + "model.embed_tokens.lora_embedding_A": torch.zeros(4, 100)}, "does not target", "invalid_weights"),
])
def test_what_does_not_map_is_refused(tensors, match, code):
    pool, modules = wrapped(tiny_llama(100))
    with pytest.raises(InvalidAdapter, match=match) as e:
        prepare("a", files(tensors), pool, modules)
    assert e.value.code == code


def test_targeted_layer_without_weights_is_refused():
    pool, modules = wrapped(tiny_llama(100))
    only_one = {P + "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                P + "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(InvalidAdapter, match="no weights") as e:  # layers.1.q_proj is targeted too
        prepare("a", files(only_one), pool, modules)
    assert e.value.code == "invalid_weights"




def test_layers_to_transform_with_its_own_layers_only_is_served():
    """The positive side of the red-team refusals: a file holding exactly the layers its config
    targets (layers_to_transform=[0]; exclude_modules) maps, and nothing else is touched."""
    pool, modules = wrapped(tiny_llama(100))
    only_one = {P + "model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64),
                P + "model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 4)}
    assert set(prepare("a", files(only_one, layers_to_transform=[0]), pool, modules).weights) == \
        {"model.layers.0.self_attn.q_proj"}
    excl = files(only_one, target_modules=["q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"])
    assert set(prepare("a", excl, pool, modules).weights) == {"model.layers.0.self_attn.q_proj"}


def test_all_linear_targets_exactly_the_pools_layers():
    """PEFT's "all-linear" shorthand (PEFT itself saves the expanded names) means every linear layer
    but the output head: a file with all of them maps; one missing a layer is refused."""
    model = tiny_llama(100)
    pool, modules = wrapped(model)
    t = {}
    for path, layer in pool.layers.items():
        t[P + f"{path}.lora_A.weight"] = torch.zeros(4, layer.fin)
        t[P + f"{path}.lora_B.weight"] = torch.zeros(layer.fout, 4)
    assert set(prepare("a", files(t, target_modules="all-linear"), pool, modules).weights) == set(pool.layers)
    first = next(iter(pool.layers))
    partial = {k: v for k, v in t.items() if f"{first}.lora_" not in k}
    with pytest.raises(InvalidAdapter, match="no weights"):
        prepare("a", files(partial, target_modules="all-linear"), pool, modules)

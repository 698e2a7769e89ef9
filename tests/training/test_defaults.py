"""The trainer's defaults: target modules per architecture family (tiny models of each), presets, short runs, gates."""

import pytest
import transformers as tf
from transformers import AutoModelForCausalLM

from server.errors import ConfigError
from server.training import defaults, gate
from server.training.trainer import TrainOptions, _peft_model, _targets

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)
ATTN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
FAMILIES = {
    "llama": (tf.LlamaConfig(**TINY), ATTN | MLP),
    "qwen2": (tf.Qwen2Config(**TINY), ATTN | MLP),
    "mistral": (tf.MistralConfig(**TINY), ATTN | MLP),
    "gpt2": (tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32),
             {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    "bloom": (tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=64),
              {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
    # No family: PEFT's all-linear, every Linear but the output head.
    "gpt_neox": (tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               vocab_size=64),
                 {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
}


def lora_modules(model):
    """The module paths that got a LoRA layer, without the layer prefix (e.g. 'mlp.c_fc')."""
    out = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})):
            parts = name.split(".")
            at = max(i for i, p in enumerate(parts) if p.isdigit())  # after the layer index
            out.add(".".join(parts[at + 1:]))
    return out


def peft_of(cfg, **kw):
    model = AutoModelForCausalLM.from_config(cfg)
    return _peft_model(model, TrainOptions(data=None, name="x", **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_default_targets_of_each_family(family):
    cfg, expected = FAMILIES[family]
    model = peft_of(cfg)
    assert lora_modules(model) == expected
    assert not any("lm_head" in n or "embed" in n for n in lora_modules(model))
    pc = model.peft_config["default"]
    assert (pc.r, pc.lora_alpha) == (defaults.RANK, defaults.ALPHA) == (16, 32)
    if family != "gpt_neox":
        assert set(_targets(model)) == set(defaults.targets_for(cfg.model_type))


def test_presets_by_name_and_explicit_lists():
    llama = FAMILIES["llama"][0]
    assert lora_modules(peft_of(llama, target_modules=["attention"])) == ATTN
    assert lora_modules(peft_of(llama, target_modules=["mlp"])) == MLP
    assert lora_modules(peft_of(llama, target_modules=["all-linear"])) == ATTN | MLP
    assert lora_modules(peft_of(llama, target_modules=["q_proj", "v_proj"])) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert lora_modules(peft_of(FAMILIES["gpt2"][0], target_modules=["mlp"])) == {"mlp.c_fc", "mlp.c_proj"}
    with pytest.raises(ConfigError, match="known architecture family"):
        peft_of(FAMILIES["gpt_neox"][0], target_modules=["attention"])
    with pytest.raises(ValueError, match="unknown target-module preset"):
        defaults.targets_for("llama", "everything")


def test_short_runs_say_so_with_the_numbers():
    assert defaults.optimizer_steps(72, 8, 1, 2.0, -1) == 18      # the case: 9 steps an epoch
    assert defaults.optimizer_steps(72, 4, 1, 2.0, -1) == 36
    assert defaults.optimizer_steps(72, 4, 2, 2.0, -1) == 18
    assert defaults.optimizer_steps(72, 4, 1, 2.0, 500) == 500     # max_steps wins
    w = defaults.short_run(18, 10_000, 5_000)
    assert w is not None and "18 optimizer steps" in w and "--epochs" in w and "--batch-size" in w
    w = defaults.short_run(200, 1_000, 5_000)
    assert w is not None and "1000 supervised tokens seen for 5000 trainable parameters" in w
    assert defaults.short_run(defaults.MIN_STEPS, 10_000, 5_000) is None


@pytest.mark.parametrize("text, adapter, base, passed", [
    ("eval_loss<0.8*base", {"eval_loss": 1.0}, {"eval_loss": 2.0}, True),
    ("eval_loss<0.8*base", {"eval_loss": 1.7}, {"eval_loss": 2.0}, False),
    ("eval_loss <= 1.5", {"eval_loss": 1.5}, {"eval_loss": 9.0}, True),
    ("exact_match>=0.9", {"exact_match": 0.85}, {}, False),
    ("exact_match>base", {"exact_match": 0.5}, {"exact_match": 0.25}, True),
    ("exact_match>base", {"exact_match": None}, {"exact_match": 0.25}, False),   # not measured: no
])
def test_gates(text, adapter, base, passed):
    out = gate.check(gate.parse(text), adapter, base)
    assert out["passed"] is passed and out["gate"] == text.strip()
    assert ("does not hold" in out["reason"] or "not measured" in out["reason"]) is not passed


@pytest.mark.parametrize("text", ["", "loss<base", "eval_loss<0.8*1.2", "eval_loss<<base", "__import__('os')",
                                  "eval_loss<base; rm -rf /", "eval_loss = base"])
def test_gates_that_do_not_parse(text):
    with pytest.raises(gate.GateError, match="cannot read the gate"):
        gate.parse(text)

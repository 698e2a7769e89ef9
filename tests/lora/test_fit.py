"""Adapter-to-base shape checks, for Linear (Llama) and Conv1D (GPT-2) projections."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from server.errors import InvalidAdapter
from server.lora.fit import check_fits
from tests.helpers import tiny_llama

P = "base_model.model."


def test_llama_shapes():
    model = tiny_llama(100)
    ok = {P + "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
          P + "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
          P + "model.layers.1.mlp.down_proj.lora_A.weight": torch.zeros(4, 128)}
    check_fits("a", model, ok, rank=4)
    bad = dict(ok)
    bad[P + "model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(96, 4)
    with pytest.raises(InvalidAdapter, match=r"needs \(64, 4\)"):
        check_fits("a", model, bad, rank=4)


def test_gpt2_conv1d_is_transposed():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=64))
    # c_attn: Conv1D(3*32, 32): in 32, out 96
    check_fits("g", model, {P + "transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32),
                            P + "transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2)}, rank=2)
    with pytest.raises(InvalidAdapter):
        check_fits("g", model, {P + "transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 96)}, rank=2)


def test_missing_module_and_no_match():
    model = tiny_llama(100)
    with pytest.raises(InvalidAdapter, match="lacks"):
        check_fits("a", model, {P + "model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}, rank=4)
    with pytest.raises(InvalidAdapter, match="matches a layer"):
        check_fits("a", model, {"something.else": torch.zeros(1)}, rank=4)
    with pytest.raises(InvalidAdapter, match="not a linear"):
        check_fits("a", model, {P + "model.norm.lora_A.weight": torch.zeros(4, 64)}, rank=4)

"""loadtest/shapes.py and gpu_bench.py: the shapes' parameter counts (the roofline's bytes), random
adapters that pass a load's checks, and a CPU smoke run of the GPU benchmark."""

import pytest
import torch

from loadtest import gpu_bench, shapes


@pytest.mark.parametrize("shape", sorted(shapes.SHAPES))
def test_parameter_counts_are_the_models(shape):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shapes.config(shape))
    assert shapes.parameters(shape) == sum(p.numel() for p in model.parameters())
    if shape == "llama-8b":
        assert 8.0e9 < shapes.parameters(shape) < 8.1e9


def test_random_adapters_pass_a_loads_checks(tmp_path):
    from server.lora.weights import read_adapter

    for rank, targets in ((8, "qv"), (16, "all")):
        folder = shapes.write_adapter("smollm2-135m", tmp_path / f"r{rank}", rank, targets, seed=rank)
        files = read_adapter(folder, max_rank=64)
        assert files.info.rank == rank and set(files.info.target_modules) == set(shapes.TARGETS[targets])
        a = files.tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] if targets == "all" else \
            files.tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
        assert a.shape == ((rank, 1536) if targets == "all" else (192, rank))


def test_the_roofline_counts_weights_kv_and_adapters():
    base = gpu_bench.roofline_ms("llama-8b", "base", 128, 128, 2, 4.8e12, 790e12)
    mixed = gpu_bench.roofline_ms("llama-8b", "mixed8", 128, 128, 2, 4.8e12, 790e12)
    weights_ms = 1e3 * shapes.parameters("llama-8b") * 2 / 4.8e12
    assert weights_ms < base < mixed < 1.2 * base      # KV on top of the weights; 8 adapters cost a little
    assert 3.3 < weights_ms < 3.4


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu(tmp_path, monkeypatch):
    import json
    import sys

    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["gpu_bench", "--device", "cpu", "--dtype", "float32", "--shape", "smollm2-135m",
                                      "--streams", "2", "--tokens", "4", "--modes", "base,one", "--out", str(out)])
    gpu_bench.main()
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["streams"], r["tokens"]) for r in rows] == [("base", 2, 8), ("one", 2, 8)]
    assert all(r["tok_s"] > 0 and r["ttft_p50_ms"] > 0 and r["full_steps"] >= 1 for r in rows)

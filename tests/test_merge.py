"""Fused export: logits match the adapter served on the base, the folder loads in plain transformers, refusals publish nothing."""

import json
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.config import ModelConfig
from server.merge import CARD_FILE, ExportError, fuse
from tests.helpers import save_adapter, tiny_tokenizer


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_fused_logits_match_the_adapter(tiny_model_dir, tiny_store, tmp_path):
    out = tmp_path / "exports" / "alpha-fused"
    card = fuse(tiny_store / "alpha", out, ModelConfig(model=str(tiny_model_dir)), cache_dir=tmp_path)
    assert card["max_abs_logit_diff"] < 1e-4
    assert json.loads((out / CARD_FILE).read_text())["adapter_sha256"] == card["adapter_sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    # Independently of the export's own check: plain transformers on the folder vs PEFT on the base.
    fused = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(base, str(tiny_store / "alpha")).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer()("the quick brown fox jumps over")["input_ids"]])
    with torch.no_grad():
        a, b, c = fused(ids).logits, served(ids).logits, plain(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-2  # the adapter really changed the model
    assert visible(out.parent) == ["alpha-fused"]


def test_quantized_base_is_dequantized_for_the_export(tiny_model_dir, tiny_store, tmp_path):
    events = []
    card = fuse(tiny_store / "alpha", tmp_path / "q", ModelConfig(model=str(tiny_model_dir), quantization="nf4"),
                cache_dir=tmp_path, report=events.append)
    assert card["base_quantization"] == "nf4" and card["dtype"] == "float32"
    assert any("dequantized" in e.get("message", "") for e in events)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" not in cfg
    AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_mismatch_beyond_tolerance_publishes_nothing(tiny_model_dir, tiny_store, tmp_path):
    with pytest.raises(ExportError, match="tolerance"):
        fuse(tiny_store / "alpha", tmp_path / "x", ModelConfig(model=str(tiny_model_dir)), cache_dir=tmp_path,
             tolerance=1e-30)
    assert visible(tmp_path) == []
    assert not list(tmp_path.glob(".staging-*"))


def test_nan_adapter_is_refused(tiny_model_dir, tmp_path):
    bad = save_adapter(tiny_model_dir, tmp_path / "nan", scale=float("nan"))
    with pytest.raises(ExportError, match="non-finite"):
        fuse(bad, tmp_path / "out" / "n", ModelConfig(model=str(tiny_model_dir)), cache_dir=tmp_path)
    assert not (tmp_path / "out" / "n").exists() and not list((tmp_path / "out").glob(".staging-*"))


def test_existing_folder_needs_replace(tiny_model_dir, tiny_store, tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        fuse(tiny_store / "alpha", tmp_path / "e", ModelConfig(model=str(tiny_model_dir)), cache_dir=tmp_path)
    fuse(tiny_store / "beta", tmp_path / "e", ModelConfig(model=str(tiny_model_dir)), cache_dir=tmp_path,
         replace=True)
    assert json.loads((tmp_path / "e" / CARD_FILE).read_text())["rank"] == 2

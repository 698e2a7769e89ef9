"""Fused export: logits match the adapter served on the base, the folder loads in plain
transformers, refusals publish nothing, a failure at any step leaves the previous export."""

import json
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.config import ModelConfig
from server.merge import CARD_FILE, ExportError, fuse
from tests.helpers import save_adapter, tiny_tokenizer

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


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


STEPS = ["weights", "tokenizer", "reload", "card", "rename"]


@pytest.mark.parametrize("step", STEPS)
def test_issue15_an_export_that_fails_at_any_step_leaves_the_old_export(step, tiny_model_dir, tiny_store, tmp_path,
                                                                         monkeypatch):
    """All or nothing: a replacing export made to fail at each step in turn (the weights write,
    the tokenizer write, the verifying reload, the card write, the rename into place) raises and
    leaves the previous export byte for byte, with no staging or aside folder behind."""
    import transformers

    import server.atomic

    cfg = ModelConfig(model=str(tiny_model_dir))
    out = tmp_path / "exports" / "e"
    fuse(tiny_store / "beta", out, cfg, cache_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*_a, **_k):
        raise OSError(f"injected failure at {step}")

    if step == "weights":
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    elif step == "tokenizer":
        monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    elif step == "reload":
        real = transformers.AutoModelForCausalLM.from_pretrained

        def reload(path, *a, **k):
            return boom() if ".staging-" in str(path) else real(path, *a, **k)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reload)
    elif step == "card":
        real_write = type(out).write_text

        def write_text(self, *a, **k):
            return boom() if self.name == CARD_FILE else real_write(self, *a, **k)
        monkeypatch.setattr(type(out), "write_text", write_text)
    else:
        real_replace = os.replace

        def replace(src, dst):
            return boom() if ".staging-e-" in str(src) else real_replace(src, dst)
        monkeypatch.setattr(server.atomic.os, "replace", replace)

    with pytest.raises(OSError, match="injected"):
        fuse(tiny_store / "alpha", out, cfg, cache_dir=tmp_path, replace=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["e"]

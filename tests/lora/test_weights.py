"""What an adapter folder may hold before any weight reaches the model."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from server.errors import InvalidAdapter
from server.lora.weights import describe_adapter, read_adapter


@pytest.fixture
def adapter(tiny_store, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(tiny_store / "alpha", dst)
    return dst


def test_reads_a_valid_adapter(adapter):
    files = read_adapter(adapter, max_rank=64)
    assert files.info.rank == 4 and files.info.alpha == 8.0
    assert files.info.target_modules == ("q_proj", "v_proj")
    assert len(files.info.sha256) == 64 and files.info.size_bytes > 0
    assert all(k.endswith(".weight") for k in files.tensors)


@pytest.mark.parametrize("card,expected", [
    ({"loftq": True, "base_quantization": "nf4"}, "nf4"),      # a LoftQ adapter: right on nf4 only
    ({"loftq": False, "base_quantization": "nf4"}, None),      # plain QLoRA starts at zero: any base
    ({"loftq": True, "base_quantization": 4}, None),
    ({"loftq": True, "base_quantization": "<script>"}, None),  # only the quantizations there are
    ("not a card", None),
    (None, None),
])
def test_the_base_a_loftq_adapter_was_made_for_is_read_from_its_card(adapter, card, expected):
    if card is not None:
        (adapter / "training.json").write_text(json.dumps(card) if isinstance(card, dict) else card)
    assert read_adapter(adapter, max_rank=64).info.base_quantization == expected
    assert describe_adapter(adapter).base_quantization == expected


def test_same_content_same_hash(adapter, tiny_store):
    assert read_adapter(adapter, max_rank=64).info.sha256 == read_adapter(tiny_store / "alpha", max_rank=64).info.sha256
    assert read_adapter(adapter, max_rank=64).info.sha256 != read_adapter(tiny_store / "beta", max_rank=64).info.sha256


def expect(folder, code, needle=""):
    with pytest.raises(InvalidAdapter) as e:
        read_adapter(folder, max_rank=64)
    assert e.value.code == code
    assert needle in e.value.message
    return e.value


def test_pickle_files_refused(adapter):
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    expect(adapter, "pickle_refused", "adapter_model.bin")


def test_missing_config(adapter):
    (adapter / "adapter_config.json").unlink()
    expect(adapter, "missing_config")


def test_missing_weights(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    expect(adapter, "missing_weights")


def test_bad_json(adapter):
    (adapter / "adapter_config.json").write_text("{not json")
    expect(adapter, "invalid_config")


def test_not_lora(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    expect(adapter, "invalid_config", "LORA")


def test_rank_over_cap(adapter):
    with pytest.raises(InvalidAdapter) as e:
        read_adapter(adapter, max_rank=2)
    assert e.value.code == "rank_too_high" and "4" in e.value.message and "2" in e.value.message


def test_truncated_safetensors(adapter):
    w = adapter / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    expect(adapter, "invalid_weights")


def test_nan_weights(adapter):
    w = adapter / "adapter_model.safetensors"
    tensors = load_file(w)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, w)
    expect(adapter, "non_finite_weights", name)


def test_not_a_folder(tmp_path):
    expect(tmp_path / "missing", "adapter_not_found")


def test_empty_weights(adapter):
    save_file({}, adapter / "adapter_model.safetensors")
    expect(adapter, "invalid_weights")

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import save_adapter, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model_dir):
    """An adapter store with two different adapters for the tiny model."""
    store = tmp_path_factory.mktemp("store")
    save_adapter(tiny_model_dir, store / "alpha", seed=1, targets=("q_proj", "v_proj"))
    save_adapter(tiny_model_dir, store / "beta", seed=2, r=2, targets=("o_proj", "down_proj"))
    return store

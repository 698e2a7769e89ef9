import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from server.app import create_app  # noqa: E402
from server.config import load_config  # noqa: E402
from server.engine.fake import FakeEngine  # noqa: E402
from tests.helpers import save_adapter, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model_dir):
    """Two different adapters for the tiny model (alpha: r=4 on q,v; beta: r=2 on o,down).
    A read-only template: a server or registry writes state into its store, so they get `store_copy`."""
    store = tmp_path_factory.mktemp("store")
    save_adapter(tiny_model_dir, store / "alpha", seed=1, targets=("q_proj", "v_proj"))
    save_adapter(tiny_model_dir, store / "beta", seed=2, r=2, targets=("o_proj", "down_proj"))
    return store


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("app never became ready: " + client.get("/ready").text)


@pytest.fixture
def make_client(store_copy):
    """Build a TestClient over a FakeEngine; keyword args go to FakeEngine, `env` to the config."""
    opened = []

    def make(env: dict | None = None, store=store_copy, **fake_kwargs):
        environ = {"LORAPLEX_ADAPTERS__DIR": str(store), **(env or {})}
        engine = FakeEngine(**fake_kwargs)
        app = create_app(load_config(environ=environ), engine=engine)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        client.engine = engine
        return client

    yield make
    for c in opened:
        c.__exit__(None, None, None)

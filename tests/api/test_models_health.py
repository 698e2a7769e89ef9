"""/v1/models, /health and /ready."""

import asyncio

from server.app import create_app
from server.config import load_config
from server.engine.fake import FakeEngine
from fastapi.testclient import TestClient


def test_models_lists_base_then_adapters(client, store_copy):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["fake-model", "alpha", "beta"]
    base, alpha, _ = data
    assert base["parent"] is None and base["object"] == "model" and base["owned_by"] == "loraplex"
    assert alpha["parent"] == "fake-model"
    assert alpha["root"] == str((store_copy / "alpha").resolve())


def test_store_skips_invalid_folders(make_client, tmp_path, tiny_store):
    import shutil
    store = tmp_path / "other-store"
    shutil.copytree(tiny_store / "alpha", store / "good")
    (store / "pickled").mkdir()
    (store / "pickled" / "adapter_config.json").write_text("{}")
    (store / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    (store / "notes").mkdir()
    c = make_client(store=store)
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake-model", "good"]


class SlowStart(FakeEngine):
    """Ready only after `release` is set, like a model still loading."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()

    async def wait_ready(self):
        await self.release.wait()


def test_ready_is_503_while_loading(tmp_path):
    engine = SlowStart()
    app = create_app(load_config(environ={"LORAPLEX_ADAPTERS__DIR": str(tmp_path)}), engine=engine)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
        assert r.status_code == 503
        c.portal.call(engine.release.set)
        from tests.conftest import wait_ready
        wait_ready(c)
        assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "x"}).status_code == 200

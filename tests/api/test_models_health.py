"""/v1/models, /health and /ready."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_config
from server.engine.fake import FakeEngine


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


def test_models_carry_max_model_len_and_retrieve_each_kind(client):
    data = client.get("/v1/models").json()["data"]
    assert all(m["max_model_len"] == 512 for m in data)
    for model_id, parent in [("fake-model", None), ("alpha", "fake-model"), ("fake-model:beta", "fake-model")]:
        r = client.get(f"/v1/models/{model_id}")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == model_id and r.json()["parent"] == parent and r.json()["max_model_len"] == 512
    r = client.get("/v1/models/ghost")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_models_retrieve_through_the_openai_client(client):
    import openai

    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="x", http_client=client)
    assert api.models.retrieve("alpha").id == "alpha"
    assert api.models.retrieve("fake-model").owned_by == "loraplex"


def test_tokenize_and_detokenize_round_trip(client):
    r = client.post("/tokenize", json={"model": "alpha", "prompt": "héllo"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list("héllo".encode()) and body["count"] == 6 and body["max_model_len"] == 512
    r = client.post("/detokenize", json={"model": "alpha", "tokens": body["tokens"]})
    assert r.json() == {"prompt": "héllo"}
    chat = client.post("/tokenize", json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                                          "return_token_strs": True}).json()
    assert bytes(chat["tokens"]).decode() == "<user>hi\n<assistant>" and chat["token_strs"][0] == "<"
    no_gen = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                            "add_generation_prompt": False}).json()
    assert bytes(no_gen["tokens"]).decode() == "<user>hi\n"


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "ghost", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"model": "alpha"}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/detokenize", {"tokens": [100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_tokenize_refusals(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_info_for_remote_tokenizers(client):
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "ByteTokenizer" and info["model_max_length"] == 512 and "eos_token" in info


def test_models_retrieve_a_blend(make_client):
    c = make_client(env={"LORAPLEX_SERVER__ADMIN_TOKEN": "adm"})
    r = c.post("/admin/blends", headers={"Authorization": "Bearer adm"},
               json={"name": "mixed", "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}],
                     "combination_type": "cat"})
    assert r.status_code == 201, r.text
    m = c.get("/v1/models/mixed").json()
    assert m["id"] == "mixed" and m["parent"] == "fake-model" and m["max_model_len"] == 512

"""Admin routes on a FakeEngine: shapes, statuses, auth, and the inference side seeing the changes."""

import shutil

import pytest

ADMIN = {"authorization": "Bearer admin-secret"}
ENV = {"LORAPLEX_SERVER__ADMIN_TOKEN": "admin-secret", "LORAPLEX_SERVER__API_KEYS": "user-key"}
USER = {"authorization": "Bearer user-key"}


@pytest.fixture
def c(make_client):
    return make_client(env=ENV)


def models(c):
    return [m["id"] for m in c.get("/v1/models", headers=USER).json()["data"]]


def test_list_shape(c, store_copy):
    data = c.get("/admin/adapters", headers=ADMIN).json()["data"]
    assert [d["name"] for d in data] == ["alpha", "beta"]
    a = data[0]
    assert set(a) >= {"name", "kind", "path", "rank", "alpha", "target_modules", "size_bytes", "sha256", "pinned",
                      "loaded", "loaded_at", "last_used_at", "requests_total"}
    assert (a["kind"], a["rank"], a["alpha"], a["target_modules"]) == ("adapter", 4, 8.0, ["q_proj", "v_proj"])
    assert a["path"] == str((store_copy / "alpha").resolve()) and a["loaded"] and len(a["sha256"]) == 64


def test_load_idempotent_conflict_delete(c, store_copy):
    shutil.copytree(store_copy / "alpha", store_copy / "new-one")
    r = c.post("/admin/adapters", json={"name": "new-one", "path": "new-one"}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["name"] == "new-one"
    assert "new-one" in models(c)
    assert c.post("/admin/adapters", json={"name": "new-one", "path": "new-one"}, headers=ADMIN).status_code == 200
    r = c.post("/admin/adapters", json={"name": "new-one", "path": "beta"}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = c.post("/admin/adapters", json={"name": "new-one", "path": "beta", "replace": True}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["rank"] == 2
    r = c.post("/v1/completions", json={"model": "new-one", "prompt": "x", "max_tokens": 30}, headers=USER)
    assert r.json()["choices"][0]["text"] == "[new-one~1] x"  # the engine serves the new version
    assert c.delete("/admin/adapters/new-one", headers=ADMIN).status_code == 200
    assert "new-one" not in models(c)
    r = c.post("/v1/completions", json={"model": "new-one", "prompt": "x"}, headers=USER)
    assert r.status_code == 404
    assert c.delete("/admin/adapters/new-one", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("body,status,code", [
    ({"name": "x", "path": "../../etc"}, 400, "path_outside_roots"),
    ({"name": "x", "path": "/etc"}, 400, "path_outside_roots"),
    ({"name": "bad/name", "path": "alpha"}, 400, "invalid_name"),
    ({"name": "x", "path": "missing-folder"}, 422, "adapter_not_found"),
    ({"name": "x"}, 400, None),
    ({"name": "x", "path": "alpha", "surprise": 1}, 400, None),
])
def test_load_refusals(c, body, status, code):
    r = c.post("/admin/adapters", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code


def test_pickle_refused_with_422(c, store_copy):
    shutil.copytree(store_copy / "alpha", store_copy / "pickled")
    (store_copy / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04.")
    r = c.post("/admin/adapters", json={"name": "pickled", "path": "pickled"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["code"] == "pickle_refused"
    assert "pickled" not in models(c)


def test_pin_and_unpin(c):
    r = c.patch("/admin/adapters/alpha", json={"pinned": True}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["pinned"] is True
    assert c.get("/admin/adapters/alpha", headers=ADMIN).json()["pinned"] is True
    assert c.patch("/admin/adapters/alpha", json={"pinned": False}, headers=ADMIN).json()["pinned"] is False
    assert c.patch("/admin/adapters/nope", json={"pinned": True}, headers=ADMIN).status_code == 404
    assert c.patch("/admin/adapters/alpha", json={"pinned": "maybe"}, headers=ADMIN).status_code == 400


def test_pin_beyond_capacity_refused(make_client):
    c = make_client(env={**ENV, "LORAPLEX_ADAPTERS__MAX_LOADED_ADAPTERS": "1"})
    assert c.patch("/admin/adapters/alpha", json={"pinned": True}, headers=ADMIN).status_code == 200
    r = c.patch("/admin/adapters/beta", json={"pinned": True}, headers=ADMIN)
    assert r.status_code == 409 and "max_loaded_adapters" in r.json()["error"]["message"]


def test_blends(c, store_copy):
    body = {"name": "both", "adapters": [{"name": "alpha", "weight": 0.6}, {"name": "beta", "weight": 0.4}],
            "combination_type": "cat"}
    r = c.post("/admin/blends", json=body, headers=ADMIN)
    assert r.status_code == 201 and r.json()["kind"] == "blend"
    assert c.post("/admin/blends", json=body, headers=ADMIN).status_code == 200
    assert "both" in models(c)
    out = c.post("/v1/completions", json={"model": "both", "prompt": "x", "max_tokens": 30}, headers=USER)
    assert out.json()["choices"][0]["text"] == "[both] x"
    r = c.post("/admin/blends", json={**body, "name": "saved", "save": True}, headers=ADMIN)
    assert r.status_code == 201 and (store_copy / "saved" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("patch,code", [
    ({"combination_type": "linear"}, "rank_mismatch"),
    ({"adapters": [{"name": "alpha", "weight": 1.0}, {"name": "ghost", "weight": 1.0}]}, "unknown_adapter"),
    ({"combination_type": "nonsense"}, "invalid_blend"),
    ({"combination_type": "ties_svd", "density": 0}, "invalid_blend"),
])
def test_blend_refusals_are_422(c, patch, code):
    body = {"name": "b", "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}], **patch}
    r = c.post("/admin/blends", json=body, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_blend_nan_weight_is_422(c):
    raw = b'{"name": "b", "adapters": [{"name": "alpha", "weight": NaN}], "combination_type": "cat"}'
    r = c.post("/admin/blends", content=raw, headers={**ADMIN, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_blend"


def test_per_request_blend(c):
    r = c.post("/v1/completions", headers=USER, json={
        "model": "fake-model", "prompt": "x", "max_tokens": 40,
        "adapters": [{"name": "alpha", "weight": 0.7}, {"name": "beta", "weight": 0.3}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"].startswith("[0.7*alpha+0.3*beta]")  # the engine got the weights
    assert models(c) == ["fake-model", "alpha", "beta"]
    r = c.post("/v1/completions", headers=USER, json={"model": "fake-model", "prompt": "x",
                                                        "adapters": [{"name": "ghost", "weight": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapters"


def test_vllm_aliases(c, store_copy):
    shutil.copytree(store_copy / "alpha", store_copy / "v")
    shutil.copytree(store_copy / "beta", store_copy / "w")
    load = lambda path, **kw: c.post("/v1/load_lora_adapter", headers=ADMIN,  # noqa: E731
                                     json={"lora_name": "v", "lora_path": str(store_copy / path), **kw})
    r = load("v")
    assert r.status_code == 200 and "v" in models(c) and r.text.startswith("Success")  # vLLM answers 200
    assert load("v").status_code == 200                          # the same content again: idempotent
    r = load("w")                                                 # other content under the name: vLLM's 400
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    sha_before = c.get("/admin/adapters/v", headers=ADMIN).json()["sha256"]
    assert load("w", load_inplace=True).status_code == 200      # vLLM's in-place replace
    assert c.get("/admin/adapters/v", headers=ADMIN).json()["sha256"] != sha_before
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=ADMIN).status_code == 200
    assert "v" not in models(c)
    r = c.post("/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


ROUTES = [("get", "/admin/adapters", None), ("post", "/admin/adapters", {"name": "x", "path": "alpha"}),
          ("delete", "/admin/adapters/alpha", None), ("patch", "/admin/adapters/alpha", {"pinned": True}),
          ("post", "/admin/blends", {"name": "b", "adapters": [{"name": "alpha", "weight": 1}]}),
          ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "alpha"}),
          ("post", "/v1/unload_lora_adapter", {"lora_name": "alpha"})]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_admin_auth_matrix(c, method, path, body):
    def call(headers):
        return getattr(c, method)(path, headers=headers, **({"json": body} if body is not None else {}))
    assert call({}).status_code == 401
    assert call({"authorization": "Bearer wrong"}).status_code == 401
    assert call(USER).status_code == 403                      # an inference key is not an admin token
    assert call(ADMIN).status_code < 300


def test_admin_token_is_not_an_inference_key(c):
    r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "x"}, headers=ADMIN)
    assert r.status_code == 401


def test_without_admin_token_only_loopback(make_client):
    c = make_client()  # TestClient's client address is "testclient", not loopback
    r = c.get("/admin/adapters")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_loopback_only"


def test_issue15_finding11_the_admin_api_lists_folders_that_failed(make_client, store_copy):
    shutil.copytree(store_copy / "alpha", store_copy / "broken")
    (store_copy / "broken" / "adapter_config.json").write_text("[]")
    c = make_client(env=ENV)
    body = c.get("/admin/adapters", headers=ADMIN).json()
    assert [f["name"] for f in body["failed"]] == ["broken"] and "JSON object" in body["failed"][0]["reason"]
    assert "broken" not in [e["name"] for e in body["data"]]
    assert c.get("/ready").status_code == 200  # one bad folder never stops the server


@pytest.mark.parametrize("field, value", [("adapters", [{"name": "alpha", "weight": 1e308}]),
                                          ("adapters", [{"name": "alpha", "weight": -1001}]),
                                          ("top_k", 2**64)])
def test_redteam_out_of_range_numbers_are_400_naming_the_field(c, field, value):
    """Both were 500s: a weight past float32 (or one that makes weight x B @ A overflow) and a top_k
    past int64."""
    r = c.post("/v1/completions", headers=USER, json={"model": "fake-model", "prompt": "x", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), r.text
    r = c.post("/admin/blends", headers=ADMIN, json={"name": "big", "adapters": [{"name": "alpha", "weight": 1e308}]})
    assert r.status_code == 422 and "[-1000, 1000]" in r.json()["error"]["message"]

"""Scale-out on Ray Serve: the router's pure parts, then a local Ray cluster with two replicas on the tiny model."""

import json
import shutil
import time

import httpx
import openai
import pytest

from server.scaleout import affinity_key, asgi_call, collect, is_admin_write
from tests.helpers import free_port, save_adapter

KNOWN = {"alpha", "beta"}


@pytest.mark.parametrize("body, key", [
    (b'{"model": "alpha", "prompt": "x"}', "alpha"),
    (b'{"model": "tiny-llama:beta", "prompt": "x"}', "beta"),
    (b'{"model": "tiny-llama", "prompt": "x"}', ""),
    (b'{"model": "nobody", "prompt": "x"}', ""),          # unknown names never claim a multiplex slot
    (b'{"model": "alpha", "adapters": [{"name": "beta", "weight": 1}]}', ""),
    (b'not json', ""),
    (b'["alpha"]', ""),
])
def test_affinity_key(body, key):
    assert affinity_key(body, KNOWN) == key


def test_admin_writes_are_recognised():
    assert is_admin_write("POST", "/admin/adapters") and is_admin_write("DELETE", "/admin/adapters/alpha")
    assert is_admin_write("POST", "/v1/load_lora_adapter") and is_admin_write("POST", "/admin/blends")
    assert not is_admin_write("GET", "/admin/adapters") and not is_admin_write("POST", "/v1/completions")


def test_asgi_call_streams_an_app_response(make_client):
    client = make_client()
    body = json.dumps({"model": "alpha", "prompt": "hello", "max_tokens": 5, "stream": True}).encode()

    async def main():
        items = [i async for i in asgi_call(client.app, "POST", "/v1/completions", "",
                                            [("content-type", "application/json")], body, "127.0.0.1")]
        plain = await collect(asgi_call(client.app, "GET", "/v1/models", "", [], b"", "127.0.0.1"))
        return items, plain
    items, plain = client.portal.call(main)  # on the app's own event loop, where its engine lives
    assert items[0]["status"] == 200 and items[0]["headers"]["content-type"].startswith("text/event-stream")
    text = b"".join(items[1:]).decode()
    assert text.count("data: ") >= 3 and text.rstrip().endswith("data: [DONE]")
    assert plain["status"] == 200 and "alpha" in plain["body"].decode()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tiny_store, tmp_path_factory):
    import ray
    from ray import serve

    from server.scaleout import build_app

    tmp = tmp_path_factory.mktemp("ray")
    store = tmp / "store"
    shutil.copytree(tiny_store, store)
    save_adapter(tiny_model_dir, store / "gamma", seed=5, r=4, targets=("q_proj", "o_proj"))
    save_adapter(tiny_model_dir, store / "delta", seed=6, r=2, targets=("v_proj",))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        env = {"LORAPLEX_MODEL__MODEL": str(tiny_model_dir), "LORAPLEX_ADAPTERS__DIR": str(store),
               "LORAPLEX_MODEL__CACHE_DIR": str(tmp / "cache"), "LORAPLEX_MODEL__DTYPE": "float32"}
        serve.run(build_app({"replicas": 2, "max_adapters_per_replica": 3, "cpus_per_replica": 0, "env": env}),
                  name="loraplex", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_for(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.e2e
def test_two_replicas_route_by_adapter_and_unload_everywhere(cluster):
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-llama", "alpha", "beta", "delta", "gamma"]
    names = ["alpha", "beta", "gamma", "delta"]
    for i in range(24):
        name = names[i % 4]
        if i % 2:
            chunks = list(client.completions.create(model=name, prompt="hello world", max_tokens=6, stream=True,
                                                    extra_body={"ignore_eos": True}))
            assert {c.model for c in chunks} == {name} and "".join(c.choices[0].text for c in chunks)
        else:
            out = client.completions.create(model=name, prompt="hello world", max_tokens=6,
                                            extra_body={"ignore_eos": True})
            assert out.model == name and out.usage.completion_tokens == 6
    # Replicas report twice a second; wait until the last request is in their reports.
    def counted():
        reps = httpx.get(cluster + "/cluster").json()["replicas"]
        total = sum(sum(r["loads"].values()) + sum(r["hits"].values()) for r in reps.values())
        return reps if total == 24 else None
    replicas = wait_for(counted)
    assert len(replicas) == 2
    loads = sum(sum(r["loads"].values()) for r in replicas.values())
    hits = sum(sum(r["hits"].values()) for r in replicas.values())
    hit_rate = hits / (hits + loads)
    print(f"\naffinity: {hits} hits, {loads} loads, hit rate {hit_rate:.2f}; per replica: "
          + "; ".join(f"{rid[-6:]} loads {r['loads']} hits {r['hits']}" for rid, r in replicas.items()))
    assert hit_rate >= 0.75, replicas
    # Each adapter's requests went to the replicas holding it: at most a reload per adapter, never one per request.
    for name in names:
        assert sum(r["loads"].get(name, 0) for r in replicas.values()) <= 2, replicas

    # An unload through the router reaches every replica.
    assert httpx.delete(cluster + "/admin/adapters/alpha").status_code == 200
    r = httpx.post(cluster + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    version = httpx.get(cluster + "/cluster").json()["version"]
    wait_for(lambda: all(rep["applied"] >= version and "alpha" not in rep["registered"]
                         for rep in httpx.get(cluster + "/cluster").json()["replicas"].values()))
    for _ in range(4):
        assert "alpha" not in [m["id"] for m in httpx.get(cluster + "/v1/models").json()["data"]]
    # A registration reaches every replica too.
    r = httpx.post(cluster + "/admin/adapters", json={"name": "alpha2", "path": "alpha"})
    assert r.status_code == 201, r.text
    wait_for(lambda: all("alpha2" in rep["registered"]
                         for rep in httpx.get(cluster + "/cluster").json()["replicas"].values()))
    # Jobs are refused at the router with a reason; metrics stay scrapeable per replica.
    r = httpx.post(cluster + "/admin/train", json={"name": "x", "data": "d.jsonl"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_supported_in_cluster"
    targets = httpx.get(cluster + "/metrics/targets").json()
    assert len(targets) == 2
    scraped = httpx.get(f"http://{targets[0]['targets'][0]}/metrics").text
    assert "loraplex_requests_total" in scraped


def test_issue15_finding16_the_router_guards_its_views_and_caps_bodies():
    """The router's helpers (no Ray): admin views need the token (or loopback without one), a
    body past the cap is refused before it is read whole, the log keeps no credentials."""
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from server.scaleout import SECRET_HEADERS, _admin_denied, _capped_body

    app = FastAPI()
    token = {"value": "adm"}

    @app.get("/view")
    async def view(request: Request):
        denied = _admin_denied(request, token["value"])
        return denied if denied is not None else {"ok": True}

    @app.post("/body")
    async def body(request: Request):
        got = await _capped_body(request, 10)
        return {"size": None if got is None else len(got)}

    c = TestClient(app)  # its client host is "testclient": not loopback
    assert c.get("/view").status_code == 401
    assert c.get("/view", headers={"authorization": "Bearer nope"}).status_code == 401
    assert c.get("/view", headers={"authorization": "Bearer adm"}).json() == {"ok": True}
    token["value"] = ""
    assert c.get("/view").status_code == 403
    assert c.post("/body", content=b"x" * 10).json() == {"size": 10}
    assert c.post("/body", content=b"x" * 11).json() == {"size": None}
    assert {"authorization", "cookie"} <= set(SECRET_HEADERS)


def test_issue15_minor_a_trailing_slash_is_not_redirected_before_auth(make_client):
    c = make_client(env={"LORAPLEX_SERVER__ADMIN_TOKEN": "adm"})
    r = c.get("/admin/adapters/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code in (401, 404) and "location" not in r.headers


def test_issue15_finding16_the_directory_log_stays_bounded_and_holds_no_credentials():
    import time as t

    from server.scaleout import Directory

    d = Directory()
    for r in ("r1", "r2"):  # replicas announce themselves before they read the store's state file
        d.report(r, {"applied": 0, "registered": [], "at": t.time()})
    for i in range(5):
        d.append({"method": "POST", "path": "/admin/adapters", "headers": [("content-type", "application/json")],
                  "body": "{}", "origin": "r1"})
    assert [op["seq"] for op in d.since(0)] == [1, 2, 3, 4, 5]
    d.report("r1", {"applied": 5, "registered": [], "at": t.time()})
    d.report("r2", {"applied": 3, "registered": [], "at": t.time()})
    assert [op["seq"] for op in d.since(0)] == [4, 5]        # what every live replica applied is dropped
    d.report("r2", {"applied": 5, "registered": [], "at": t.time()})
    assert d.since(0) == [] and d.view()["version"] == 5 and d.append({"path": "/x"}) == 6
    d.report("dead", {"applied": 0, "registered": [], "at": t.time() - 3600})  # a silent replica is not waited for
    d.report("r1", {"applied": 6, "registered": [], "at": t.time()})
    d.report("r2", {"applied": 6, "registered": [], "at": t.time()})
    assert d.since(0) == []
    assert all("authorization" not in dict(op.get("headers", [])) for op in d.ops)

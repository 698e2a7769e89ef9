"""Scale-out on Ray Serve: the router's pure parts, then a local Ray cluster with two replicas on the tiny model."""

import json
import shutil
import time

import httpx
import openai
import pytest

from server.scaleout import affinity_key, asgi_call, collect, is_admin_write
from tests.helpers import free_port, save_adapter

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

KNOWN = {"alpha", "beta"}
# Four replicas, two routers and two directories share two cores with the rest of the suite: a
# call through the router can take seconds (httpx's default timeout is 5 s).
http = httpx.Client(timeout=120)


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
    assert is_admin_write("PUT", "/admin/aliases/prod") and is_admin_write("POST", "/admin/aliases/prod/rollback")
    assert not is_admin_write("GET", "/admin/adapters") and not is_admin_write("POST", "/v1/completions")
    assert not is_admin_write("GET", "/admin/aliases")


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


ADMIN, KEY = "adm-secret", "key-secret"


def reachable_address() -> str | None:
    """This host's address on its default route (not loopback), to be a non-loopback client."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks the route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@pytest.fixture(scope="module")
def ray_apps(tiny_model_dir, tiny_store, tmp_path_factory):
    """Two loraplex apps on one local Ray Serve: "open" (no credentials configured: admin answers
    loopback only) at /, and "secured" (an API key, an admin token, admin-only /metrics) at /secured."""
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
        serve.start(http_options={"host": "0.0.0.0", "port": port})
        env = {"LORAPLEX_MODEL__MODEL": str(tiny_model_dir), "LORAPLEX_ADAPTERS__DIR": str(store),
               "LORAPLEX_MODEL__CACHE_DIR": str(tmp / "cache"), "LORAPLEX_MODEL__DTYPE": "float32"}
        secured = {**env, "LORAPLEX_SERVER__API_KEYS": KEY, "LORAPLEX_SERVER__ADMIN_TOKEN": ADMIN,
                   "LORAPLEX_SERVER__METRICS_ACCESS": "admin"}
        secured["LORAPLEX_ADAPTERS__DIR"] = str(shutil.copytree(store, tmp / "store-secured"))  # its own state
        serve.run(build_app({"replicas": 2, "max_adapters_per_replica": 3, "cpus_per_replica": 0, "env": env}),
                  name="loraplex", route_prefix="/")
        serve.run(build_app({"replicas": 2, "max_adapters_per_replica": 3, "cpus_per_replica": 0,
                             "env": secured}), name="secured", route_prefix="/secured")
        yield {"port": port, "open": f"http://127.0.0.1:{port}", "secured": f"http://127.0.0.1:{port}/secured"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_apps):
    return ray_apps["open"]


def wait_for(check, timeout=90.0):
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
        reps = http.get(cluster + "/cluster").json()["replicas"]
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
    assert http.delete(cluster + "/admin/adapters/alpha").status_code == 200
    r = http.post(cluster + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    version = http.get(cluster + "/cluster").json()["version"]
    wait_for(lambda: all(rep["applied"] >= version and "alpha" not in rep["registered"]
                         for rep in http.get(cluster + "/cluster").json()["replicas"].values()))
    for _ in range(4):
        assert "alpha" not in [m["id"] for m in http.get(cluster + "/v1/models").json()["data"]]
    # A registration reaches every replica too.
    r = http.post(cluster + "/admin/adapters", json={"name": "alpha2", "path": "alpha"})
    assert r.status_code == 201, r.text
    wait_for(lambda: all("alpha2" in rep["registered"]
                         for rep in http.get(cluster + "/cluster").json()["replicas"].values()))
    # Jobs are refused at the router with a reason; metrics stay scrapeable per replica.
    r = http.post(cluster + "/admin/train", json={"name": "x", "data": "d.jsonl"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_supported_in_cluster"
    targets = http.get(cluster + "/metrics/targets").json()
    assert len(targets) == 2
    scraped = http.get(f"http://{targets[0]['targets'][0]}/metrics").text
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
        denied = _admin_denied(request, token["value"], ["key"])
        return denied if denied is not None else {"ok": True}

    @app.post("/body")
    async def body(request: Request):
        got = await _capped_body(request, 10)
        return {"size": None if got is None else len(got)}

    c = TestClient(app)  # its client host is "testclient": not loopback
    assert c.get("/view").status_code == 401
    assert c.get("/view", headers={"authorization": "Bearer nope"}).status_code == 401
    assert c.get("/view", headers={"authorization": "Bearer adm"}).json() == {"ok": True}
    r = c.get("/view", headers={"authorization": "Bearer key"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
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
    for _i in range(5):
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


CREDS = {"none": {}, "wrong": {"authorization": "Bearer nope"}, "key": {"authorization": f"Bearer {KEY}"},
         "admin": {"authorization": f"Bearer {ADMIN}"}, "admin-lowercase": {"authorization": f"bearer {ADMIN}"}}
# (method, path, body, class): what each route needs.
ROUTES = [
    ("GET", "/health", None, "public"),
    ("GET", "/v1/models", None, "inference"),
    ("POST", "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 1}, "inference"),
    ("POST", "/tokenize", {"model": "alpha", "prompt": "hi"}, "inference"),
    ("GET", "/metrics", None, "metrics"),
    ("GET", "/admin/adapters", None, "admin"),
    ("POST", "/admin/adapters", {"name": "zz", "path": "no-such-folder"}, "admin"),
    ("DELETE", "/admin/adapters/no-such", None, "admin"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "zz", "lora_path": "no-such-folder"}, "admin"),
    ("POST", "/admin/train", {"name": "x", "data": "d.jsonl"}, "admin"),
]
ROUTER_VIEWS = [("GET", "/cluster"), ("GET", "/metrics/targets")]


def expected(cls: str, cred: str) -> set[int]:
    allowed = {"public": set(CREDS), "inference": {"key"}, "metrics": {"admin", "admin-lowercase"},
               "admin": {"admin", "admin-lowercase"}}[cls]
    if cred in allowed:
        return set(range(200, 500)) - {401, 403}
    return {403} if (cls == "admin" and cred == "key") else {401}


@pytest.mark.e2e
def test_issue15_finding16_the_router_enforces_what_the_server_does(ray_apps, make_client):
    """The auth matrix through the Ray router (an API key, an admin token, admin-only /metrics):
    every route and credential answers as the table says and as a single server with the same
    configuration does, the router's own views and job refusals included; admin writes made with
    the token are replayed on the other replica (with its own token: the log holds none)."""
    base = ray_apps["secured"]
    single = make_client(env={"LORAPLEX_SERVER__API_KEYS": KEY, "LORAPLEX_SERVER__ADMIN_TOKEN": ADMIN,
                              "LORAPLEX_SERVER__METRICS_ACCESS": "admin"})
    seen = []
    for method, path, body, cls in ROUTES:
        for cred, headers in CREDS.items():
            r = http.request(method, base + path, json=body, headers=headers)
            assert r.status_code in expected(cls, cred), (method, path, cred, r.status_code, r.text)
            if path != "/admin/train":  # jobs run on a single server, and are refused by the router
                s = single.request(method, path, json=body, headers=headers)
                assert s.status_code == r.status_code, (method, path, cred, s.status_code, r.status_code)
                if r.status_code in (401, 403):
                    assert r.json()["error"]["code"] == s.json()["error"]["code"]
            seen.append((path, cred, r.status_code))
    for method, path in ROUTER_VIEWS:
        for cred, headers in CREDS.items():
            r = http.request(method, base + path, headers=headers)
            assert r.status_code in expected("admin", cred), (path, cred, r.status_code, r.text)
    r = http.post(base + "/admin/train", json={"name": "x", "data": "d.jsonl"}, headers=CREDS["admin"])
    assert r.json()["error"]["code"] == "not_supported_in_cluster"
    # With admin-only metrics, replicas start no unauthenticated metrics server.
    assert http.get(base + "/metrics/targets", headers=CREDS["admin"]).json() == []

    r = http.post(base + "/admin/adapters", json={"name": "alpha2", "path": "alpha"}, headers=CREDS["admin"])
    assert r.status_code == 201, r.text
    view = lambda: http.get(base + "/cluster", headers=CREDS["admin"]).json()  # noqa: E731
    wait_for(lambda: len(view()["replicas"]) == 2 and all("alpha2" in rep["registered"]
                                                          for rep in view()["replicas"].values()))
    print(f"\n{len(seen)} route x credential answers through the router; " +
          ", ".join(f"{p} {c} {s}" for p, c, s in seen[:6]) + " ...")


@pytest.mark.e2e
def test_issue15_finding16_no_token_means_loopback_only_through_the_router(ray_apps):
    """With no admin token configured, admin routes and the router's views answer loopback
    clients only: the router passes the real client address on, never its own."""
    addr = reachable_address()
    if addr is None:
        pytest.skip("this host has no non-loopback address to connect from")
    remote = f"http://{addr}:{ray_apps['port']}"
    for path in ("/admin/adapters", "/cluster", "/metrics/targets"):
        r = http.get(remote + path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_loopback_only", (path, r.text)
        assert http.get(ray_apps["open"] + path).status_code == 200
    r = http.post(remote + "/admin/adapters", json={"name": "sneaky", "path": "alpha"})
    assert r.status_code == 403
    assert http.get(remote + "/v1/models").status_code == 200   # inference needs no key here

"""Deny by default: every route has a class, the right guard, and the auth matrix holds for each."""

import pytest
from fastapi.routing import APIRoute

from server.api.deps import require_admin, require_inference, require_metrics, route_class

# "scoped-key: alpha" may use the adapter alpha only (the matrix's paths name alpha).
ENV = {"LORAPLEX_SERVER__ADMIN_TOKEN": "adm-token", "LORAPLEX_SERVER__API_KEYS": "inf-key,scoped-key: alpha"}
CREDS = {"none": None, "inference": "inf-key", "scoped": "scoped-key", "admin": "adm-token", "wrong": "nope"}
INFERENCE_KEYS = {"inference", "scoped"}


def guards(route: APIRoute) -> set:
    found = set()

    def walk(dep):
        for d in dep.dependencies:
            found.add(d.call)
            walk(d)
    walk(route.dependant)
    return found


def flat(routes):
    """Routes with their paths (this FastAPI keeps included routers as wrappers around the originals)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from flat(inner.routes)
        else:
            yield r


def all_routes(app):
    for route in flat(app.routes):
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                path = route.path.replace("{name}", "alpha").replace("{job_id}", "nope").replace("{alias}", "nope")
                yield route, method, path.replace("{model_id:path}", "alpha")


def test_every_route_has_a_class_and_its_guard(make_client):
    app = make_client().app
    seen = set()
    for route, _, _path in all_routes(app):
        cls = route_class(route.path)
        assert cls is not None, f"{route.path} belongs to no route class: add it to api/deps.route_class"
        seen.add(cls)
        if isinstance(route, APIRoute):
            g = guards(route)
            expected = {"inference": require_inference, "admin": require_admin, "metrics": require_metrics}.get(cls)
            if expected is not None:
                assert expected in g, f"{route.path} ({cls}) lacks {expected.__name__}"
            else:
                assert not g & {require_inference, require_admin}, route.path
    assert seen == {"public", "metrics", "inference", "admin"}
    assert route_class("/docs") is None and route_class("/v2/anything") is None


def test_auth_matrix(make_client):
    client = make_client(env=ENV)
    checked = 0
    for route, method, path in all_routes(client.app):
        cls = route_class(route.path)
        for who, token in CREDS.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            r = client.request(method, path, headers=headers, json={} if method in ("POST", "PATCH", "PUT") else None)
            assert r.status_code < 500, (method, path, who, r.text)
            denied = r.status_code in (401, 403)
            if cls in ("public", "metrics"):
                assert not denied, (method, path, who)
            elif cls == "inference":
                assert denied == (who not in INFERENCE_KEYS), (method, path, who, r.status_code)
                if denied:
                    assert r.status_code == 401
            else:  # admin
                assert denied == (who != "admin"), (method, path, who, r.status_code)
                if denied:
                    assert r.status_code == (403 if who in INFERENCE_KEYS else 401), (method, path, who)
            if denied:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            checked += 1
    assert checked >= 5 * 20


@pytest.mark.parametrize("access, token, status", [
    ("admin", None, 401), ("admin", "inf-key", 401), ("admin", "adm-token", 200),
    ("inference", None, 401), ("inference", "inf-key", 200), ("public", None, 200),
    ("inference", "scoped-key", 401),  # a scoped key does not read /metrics: it names every adapter
])
def test_metrics_access_is_configurable(make_client, access, token, status):
    client = make_client(env={**ENV, "LORAPLEX_SERVER__METRICS_ACCESS": access})
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == status


def test_no_docs_pages(make_client):
    client = make_client()
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200


# -- scoped keys: which key may use which adapter --------------------------------------
SCOPED = {"LORAPLEX_SERVER__ADMIN_TOKEN": "adm-token",
          "LORAPLEX_SERVER__API_KEYS": "all-key,alpha-key: alph? ,base-key: fake-model alpha"}


def _ask(client, key, model, route):
    h = {"Authorization": f"Bearer {key}"}
    if route == "completions":
        return client.post("/v1/completions", headers=h, json={"model": model, "prompt": "hi", "max_tokens": 2})
    if route == "chat":
        return client.post("/v1/chat/completions", headers=h, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    if route == "responses":
        return client.post("/v1/responses", headers=h, json={"model": model, "input": "hi", "max_output_tokens": 2})
    if route == "retrieve":
        return client.get(f"/v1/models/{model}", headers=h)
    if route == "tokenize":
        return client.post("/tokenize", headers=h, json={"model": model, "prompt": "hi"})
    assert route == "detokenize"
    return client.post("/detokenize", headers=h, json={"model": model, "tokens": [1, 2]})


ROUTES = ["completions", "chat", "responses", "retrieve", "tokenize", "detokenize"]


@pytest.mark.parametrize("route", ROUTES)
def test_a_scoped_key_gets_404_for_what_it_may_not_use_on_every_route(make_client, route):
    client = make_client(env=SCOPED)
    # (key, model) -> may it?  alpha-key: alpha and fake-model:alpha only; base-key also the base.
    cases = {("all-key", "alpha"): True, ("all-key", "beta"): True, ("all-key", "fake-model"): True,
             ("alpha-key", "alpha"): True, ("alpha-key", "fake-model:alpha"): True,
             ("alpha-key", "beta"): False, ("alpha-key", "fake-model:beta"): False, ("alpha-key", "fake-model"): False,
             ("base-key", "fake-model"): True, ("base-key", "alpha"): True, ("base-key", "beta"): False}
    for (key, model), may in cases.items():
        r = _ask(client, key, model, route)
        if may:
            assert r.status_code == 200, (key, model, r.text)
            continue
        assert r.status_code == 404, (key, model, r.text)
        # Exactly what a name nobody serves gets, but for the name: the scope does not leak names.
        ghost = _ask(client, key, "ghost", route)
        assert ghost.status_code == 404
        assert r.json()["error"]["code"] == ghost.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["message"].replace(repr(model), "X", 1) == ghost.json()["error"]["message"].replace(
            "'ghost'", "X")
        assert "beta" not in r.json()["error"]["message"].replace(repr(model), "")


def test_v1_models_lists_only_what_the_key_may_use_and_admin_sees_all(make_client):
    client = make_client(env=SCOPED)

    def ids(key):
        r = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return [m["id"] for m in r.json()["data"]]
    assert ids("all-key") == ["fake-model", "alpha", "beta"]
    assert ids("alpha-key") == ["alpha"]
    assert ids("base-key") == ["fake-model", "alpha"]
    admin = client.get("/admin/adapters", headers={"Authorization": "Bearer adm-token"})
    assert sorted(e["name"] for e in admin.json()["data"]) == ["alpha", "beta"]


def test_a_scoped_key_cannot_mix_an_adapter_outside_its_scope(make_client):
    client = make_client(env={**SCOPED, "LORAPLEX_SERVER__API_KEYS": "mix-key: fake-model alpha"})
    h = {"Authorization": "Bearer mix-key"}

    def mix(*names):
        return client.post("/v1/completions", headers=h, json={
            "model": "fake-model", "prompt": "hi", "max_tokens": 2,
            "adapters": [{"name": n, "weight": 0.5} for n in names]})
    assert mix("alpha").status_code == 200
    outside, ghost = mix("alpha", "beta"), mix("alpha", "ghost")
    assert outside.status_code == ghost.status_code == 400
    assert outside.json()["error"]["code"] == ghost.json()["error"]["code"] == "unknown_adapter"


def test_a_scoped_key_sees_blends_by_their_own_name(make_client):
    client = make_client(env={**SCOPED, "LORAPLEX_SERVER__API_KEYS": "k: team-*"})
    r = client.post("/admin/blends", headers={"Authorization": "Bearer adm-token"}, json={
        "name": "team-mix", "combination_type": "cat",
        "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}]})
    assert r.status_code in (200, 201), r.text
    assert _ask(client, "k", "team-mix", "completions").status_code == 200
    assert _ask(client, "k", "alpha", "completions").status_code == 404
    # An alias too: judged by its own name, whatever it points at.
    r = client.put("/admin/aliases/team-prod", headers={"Authorization": "Bearer adm-token"}, json={"target": "beta"})
    assert r.status_code == 201, r.text
    assert _ask(client, "k", "team-prod", "completions").status_code == 200
    assert _ask(client, "k", "beta", "completions").status_code == 404
    ids = [m["id"] for m in client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()["data"]]
    assert ids == ["team-mix", "team-prod"]

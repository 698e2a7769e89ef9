"""Deny by default: every route has a class, the right guard, and the auth matrix holds for each."""

import pytest
from fastapi.routing import APIRoute

from server.api.deps import require_admin, require_inference, require_metrics, route_class

ENV = {"LORAPLEX_SERVER__ADMIN_TOKEN": "adm-token", "LORAPLEX_SERVER__API_KEYS": "inf-key"}
CREDS = {"none": None, "inference": "inf-key", "admin": "adm-token", "wrong": "nope"}


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
                path = route.path.replace("{name}", "alpha").replace("{job_id}", "nope")
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
            r = client.request(method, path, headers=headers, json={} if method in ("POST", "PATCH") else None)
            assert r.status_code < 500, (method, path, who, r.text)
            denied = r.status_code in (401, 403)
            if cls in ("public", "metrics"):
                assert not denied, (method, path, who)
            elif cls == "inference":
                assert denied == (who != "inference"), (method, path, who, r.status_code)
                if denied:
                    assert r.status_code == 401
            else:  # admin
                assert denied == (who != "admin"), (method, path, who, r.status_code)
                if denied:
                    assert r.status_code == (403 if who == "inference" else 401), (method, path, who)
            if denied:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            checked += 1
    assert checked >= 4 * 20


@pytest.mark.parametrize("access, token, status", [
    ("admin", None, 401), ("admin", "inf-key", 401), ("admin", "adm-token", 200),
    ("inference", None, 401), ("inference", "inf-key", 200), ("public", None, 200),
])
def test_metrics_access_is_configurable(make_client, access, token, status):
    client = make_client(env={**ENV, "LORAPLEX_SERVER__METRICS_ACCESS": access})
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == status


def test_no_docs_pages(make_client):
    client = make_client()
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200

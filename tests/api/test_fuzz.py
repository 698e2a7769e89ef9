"""Schemathesis fuzzes every operation of the app's OpenAPI schema against a live server (real uvicorn,
FakeEngine): at least 2,000 generated requests, no 5xx, no hang."""

import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server.app import create_app
from server.config import load_config
from server.engine.fake import FakeEngine
from tests.helpers import LiveApp

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

CALLS = {"n": 0, "by_status": {}}


@pytest.fixture(scope="module")
def live(tiny_store, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    store = tmp / "store"
    shutil.copytree(tiny_store, store)
    (tmp / "data").mkdir()
    env = {"LORAPLEX_ADAPTERS__DIR": str(store), "LORAPLEX_MODEL__MODEL": str(tiny_model_dir),
           "LORAPLEX_TRAIN__DATA_DIR": str(tmp / "data"), "LORAPLEX_TRAIN__EXPORTS_DIR": str(tmp / "exports"),
           "LORAPLEX_TRAIN__MAX_QUEUED_JOBS": "1", "LORAPLEX_SERVER__MAX_PROMPTS": "4", "LORAPLEX_SERVER__MAX_N": "2",
           "LORAPLEX_SERVER__REQUEST_TIMEOUT_S": "10"}
    with LiveApp(create_app(load_config(environ=env), engine=FakeEngine(context_length=256))) as live_app:
        yield live_app.url


def _schema():
    """The app's own OpenAPI document (an app object only; nothing starts)."""
    app = create_app(load_config(environ={"LORAPLEX_ADAPTERS__DIR": "unused"}), engine=FakeEngine())
    return schemathesis.openapi.from_dict(app.openapi())


schema = _schema()


@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors(case, live):
    response = case.call(base_url=live, timeout=30)  # a hang fails here
    CALLS["n"] += 1
    CALLS["by_status"][response.status_code] = CALLS["by_status"].get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    ctype = response.headers.get("content-type") or ""
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if response.status_code >= 400 and ctype.startswith("application/json"):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_enough_requests_were_generated(live):
    print(f"\nfuzz: {CALLS['n']} requests, by status {sorted(CALLS['by_status'].items())}")
    assert CALLS["n"] >= 2000, CALLS
    assert httpx.get(live + "/ready").status_code == 200  # and the server still serves

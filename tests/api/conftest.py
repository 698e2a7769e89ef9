import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_config
from server.engine.fake import FakeEngine


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


@pytest.fixture
def client(make_client):
    return make_client()

"""A client that goes away stops its generation (real uvicorn, FakeEngine)."""

import time

import httpx
import pytest

from server.app import create_app
from server.config import load_config
from server.engine.fake import FakeEngine
from tests.helpers import LiveApp


@pytest.fixture
def live(store_copy):
    engine = FakeEngine(token_delay=0.02)
    app = create_app(load_config(environ={"LORAPLEX_ADAPTERS__DIR": str(store_copy)}), engine=engine)
    with LiveApp(app) as live_app:
        yield live_app.url, engine, app.state.loraplex.registry


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


PAYLOAD = {"model": "fake-model", "prompt": "x", "max_tokens": 400, "ignore_eos": True}


def test_stream_disconnect_aborts(live):
    url, engine, _ = live
    with httpx.stream("POST", url + "/v1/completions", json={**PAYLOAD, "stream": True}) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    assert wait_for(lambda: not engine.running), "generation kept running after the client left"
    assert len(engine.aborted) == 1


def test_non_stream_disconnect_aborts(live):
    url, engine, _ = live
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=PAYLOAD, timeout=0.5)
    assert wait_for(lambda: not engine.running), "generation kept running after the client left"
    assert len(engine.aborted) == 1
    # and the server still answers
    r = httpx.post(url + "/v1/completions", json={"model": "fake-model", "prompt": "ok", "max_tokens": 20})
    assert r.json()["choices"][0]["text"] == "[base] ok"


def test_stream_n_disconnect_aborts_every_choice(live):
    url, engine, _ = live
    with httpx.stream("POST", url + "/v1/chat/completions",
                      json={**{k: v for k, v in PAYLOAD.items() if k != "prompt"}, "n": 3, "stream": True,
                            "messages": [{"role": "user", "content": "x"}]}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 8:
                break
    assert wait_for(lambda: not engine.running)
    assert len(engine.aborted) == 3


def test_in_flight_counts_exact_after_disconnects_and_n(live):
    url, engine, reg = live
    body = {**PAYLOAD, "model": "alpha", "n": 3}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 5, "n": 2})
    assert r.status_code == 200
    entry = reg.get("alpha")
    assert wait_for(lambda: entry.inflight == 0), entry.inflight
    assert entry.requests_total == 3     # one per HTTP request, whatever n


def test_issue15_finding14_a_client_that_stops_reading_loses_its_stream_and_lease(store_copy):
    """A raw socket that sends a streaming request and never reads: once the socket is full the
    send blocks; past server.stream_idle_timeout_s the stream ends and the lease is released."""
    import json
    import socket

    engine = FakeEngine(context_length=300_000)
    env = {"LORAPLEX_ADAPTERS__DIR": str(store_copy), "LORAPLEX_SERVER__STREAM_IDLE_TIMEOUT_S": "1",
           "LORAPLEX_SERVER__MAX_TOKENS": "200000"}
    app = create_app(load_config(environ=env), engine=engine)
    registry = app.state.loraplex.registry
    with LiveApp(app) as live_app:
        host, port = live_app.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 200000, "ignore_eos": True,
                           "stream": True}).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            assert wait_for(lambda: engine.running, 5)
            assert wait_for(lambda: not engine.running, 30), "a stream nobody reads kept generating"
            assert len(engine.aborted) == 1
            assert wait_for(lambda: registry.get("alpha").inflight == 0, 5), "its lease was never released"
        finally:
            s.close()
        r = httpx.post(live_app.url + "/v1/completions", json={"model": "alpha", "prompt": "ok", "max_tokens": 20})
        assert r.status_code == 200

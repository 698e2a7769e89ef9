"""server.request_timeout_s: a request still generating past it ends (408, or an error event), freeing its slot."""

import json


def test_non_streaming_request_past_the_timeout_gets_408(make_client):
    client = make_client(env={"LORAPLEX_SERVER__REQUEST_TIMEOUT_S": "0.3"}, token_delay=0.02)
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hello", "max_tokens": 200,
                                             "ignore_eos": True})
    assert r.status_code == 408, r.text
    assert r.json()["error"]["code"] == "request_timeout" and r.json()["error"]["type"] == "timeout_error"
    # A short request on the same server is unaffected.
    ok = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200


def test_stream_past_the_timeout_ends_with_an_error_event(make_client):
    client = make_client(env={"LORAPLEX_SERVER__REQUEST_TIMEOUT_S": "0.3"}, token_delay=0.02)
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    last = json.loads(events[-1]) if events[-1] != "[DONE]" else json.loads(events[-2])
    assert last["error"]["code"] == "request_timeout"
    assert sum(1 for e in events if e != "[DONE]" and "choices" in json.loads(e)) > 3  # it streamed first


def test_zero_means_no_timeout(make_client):
    client = make_client(env={"LORAPLEX_SERVER__REQUEST_TIMEOUT_S": "0"}, token_delay=0.005)
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 40,
                                             "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40

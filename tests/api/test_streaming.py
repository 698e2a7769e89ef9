"""SSE framing of streamed completions and chat completions."""

import json


def events(client, path, payload):
    with client.stream("POST", path, json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    payloads = [ln[len("data:"):].strip() for ln in lines]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_completion_stream_text_and_usage(client):
    chunks = events(client, "/v1/completions", {"model": "alpha", "prompt": "hey", "max_tokens": 50, "stream": True,
                                                "stream_options": {"include_usage": True}})
    *body, last = chunks
    assert "".join(c["choices"][0]["text"] for c in body) == "[alpha] hey"
    assert body[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert len(body) >= 5  # token by token, not one blob
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3, "completion_tokens": 12,
                                                       "total_tokens": 15}
    assert len({c["id"] for c in chunks}) == 1


def test_completion_stream_without_usage(client):
    chunks = events(client, "/v1/completions", {"model": "fake-model", "prompt": "a", "max_tokens": 4,
                                                "stream": True})
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_holds_back_stop_prefix(client):
    chunks = events(client, "/v1/completions", {"model": "fake-model", "prompt": "hello there", "max_tokens": 50,
                                                "stream": True, "stop": "there"})
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "[base] hello "
    assert "t" not in "".join(c["choices"][0]["text"] for c in chunks)


def test_chat_stream_role_then_content(client):
    chunks = events(client, "/v1/chat/completions", {
        "model": "beta", "stream": True, "stream_options": {"include_usage": True}, "n": 2,
        "messages": [{"role": "user", "content": "yo"}]})
    assert chunks[0]["object"] == "chat.completion.chunk"
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1]
    for i in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == i)
        assert text == "[beta] <user>yo\n<assistant>"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * (len("[beta] <user>yo\n<assistant>") + 1)


def test_stream_logprobs(client):
    chunks = events(client, "/v1/chat/completions", {"model": "fake-model", "stream": True, "max_tokens": 3,
                                                     "logprobs": True, "messages": [{"role": "user", "content": "x"}]})
    toks = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks if c["choices"][0]["logprobs"]]
    assert toks == ["[", "b", "a"]


def test_stream_errors_before_start_are_plain_http(client):
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x", "stream": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

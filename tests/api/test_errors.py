"""Bad input: a 4xx in OpenAI's error shape, never a 500 or a hang, and the server keeps serving."""

import pytest


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


BAD_COMPLETIONS = [
    ({"model": "fake-model", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "fake-model", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "fake-model", "prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ({"model": "fake-model", "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"model": "fake-model", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "fake-model", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "fake-model", "prompt": "x", "n": 1000}, "n"),
    ({"model": "fake-model", "prompt": "x", "n": 0}, "n"),
    ({"model": "fake-model", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "fake-model", "prompt": "x", "stop": ["s"] * 9}, "stop"),
    ({"model": "fake-model", "prompt": "x", "logprobs": 500}, "logprobs"),
    ({"model": "fake-model", "prompt": "x", "max_tokens": 1000}, "max_tokens"),  # beyond the 512 context
    ({"model": "fake-model", "prompt": "x" * 600}, "prompt"),                   # longer than the context
    ({"model": "fake-model", "prompt": ""}, "prompt"),
    ({"model": "fake-model", "prompt": []}, "prompt"),
    ({"model": "fake-model", "prompt": [1, 99999]}, "prompt"),
    ({"model": "fake-model", "prompt": 5}, "prompt"),
    ({"model": "fake-model"}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "fake-model", "prompt": "x", "echo": True, "suffix": "y"}, "suffix"),
    ({"model": "fake-model", "prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"model": "fake-model", "prompt": "x", "seed": 2**70}, "seed"),
    ({"model": "fake-model", "prompt": "x", "stream": "maybe"}, "stream"),
]


@pytest.mark.parametrize("payload,param", BAD_COMPLETIONS)
def test_bad_completion_requests(client, payload, param):
    assert_error(client.post("/v1/completions", json=payload), 400, param)
    assert client.engine.submitted == []  # refused before any model work


BAD_CHATS = [
    ({"model": "fake-model", "messages": []}, "messages"),
    ({"model": "fake-model", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "fake-model", "messages": [{"content": "x"}]}, "messages.0.role"),
    ({"model": "fake-model", "messages": "hello"}, "messages"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5},
     "max_completion_tokens"),
]


@pytest.mark.parametrize("payload,param", BAD_CHATS)
def test_bad_chat_requests(client, payload, param):
    assert_error(client.post("/v1/chat/completions", json=payload), 400, param)


def test_a_full_context_blames_the_prompt_field_of_each_route(client):
    """No max_tokens and a prompt that fills the whole context: no room to generate. Chat names
    `messages` (it has no `prompt`), completions name `prompt`."""
    from server.engine.fake import ByteTokenizer

    context = client.engine.context_length
    frame = len(ByteTokenizer().apply_chat_template([{"role": "user", "content": ""}]))
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * (context - frame)}]}
    r = client.post("/v1/chat/completions", json=chat)
    assert_error(r, 400, "messages")
    assert "no room to generate" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * context})
    assert_error(r, 400, "prompt")
    assert "no room to generate" in r.json()["error"]["message"]
    assert client.engine.submitted == []


def test_unknown_model_is_404(client):
    err = assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    err = assert_error(client.post("/v1/chat/completions", json={
        "model": "fake-model:nope", "messages": [{"role": "user", "content": "x"}]}), 404, "model")
    assert err["code"] == "model_not_found"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"null", b'{"model": NaN}'])
def test_malformed_json(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_nan_values_refused(client):
    r = client.post("/v1/completions", content=b'{"model": "fake-model", "prompt": "x", "temperature": NaN}',
                    headers={"content-type": "application/json"})
    assert_error(r, 400, "temperature")


def test_body_too_large(make_client):
    c = make_client(env={"LORAPLEX_SERVER__MAX_BODY_BYTES": "1000"})
    r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * 2000})
    assert_error(r, 413)

    def chunks():  # no Content-Length: the cap applies while reading
        for _ in range(10):
            yield b"x" * 500
    r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_caps_are_configurable(make_client):
    c = make_client(env={"LORAPLEX_SERVER__MAX_N": "2", "LORAPLEX_SERVER__MAX_TOKENS": "10"})
    assert_error(c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "n": 3}), 400, "n")
    assert_error(c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 11}), 400,
                 "max_tokens")
    assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 10}).status_code == 200


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_server_keeps_serving_after_bad_input(client):
    for payload, _ in BAD_COMPLETIONS:
        client.post("/v1/completions", json=payload)
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "ok", "max_tokens": 20})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "[base] ok"


def test_queue_full_is_429_with_retry_after(make_client):
    c = make_client(max_waiting_requests=0)
    r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
    assert_error(r, 429)
    assert r.headers["retry-after"] == "1"


def test_api_keys(make_client):
    c = make_client(env={"LORAPLEX_SERVER__API_KEYS": "k1,k2"})
    payload = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
    assert_error(c.post("/v1/completions", json=payload), 401)
    assert_error(c.post("/v1/completions", json=payload, headers={"authorization": "Bearer wrong"}), 401)
    assert_error(c.get("/v1/models"), 401)
    assert c.post("/v1/completions", json=payload, headers={"authorization": "Bearer k2"}).status_code == 200
    assert c.get("/health").status_code == 200  # public


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", '{"model": "fake-model", "prompt": "a\\ud800b", "max_tokens": 3}'),
    ("/v1/completions", '{"model": "fake-model", "prompt": ["ok", "a\\udfffb"], "max_tokens": 3}'),
    ("/v1/chat/completions", '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\udc00b"}]}'),
    ("/v1/chat/completions",
     '{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stop": "\\ud800"}'),
    ("/v1/responses", '{"model": "fake-model", "input": [{"role": "user", "content": "\\ud800"}]}'),
    ("/tokenize", '{"prompt": "a\\ud800"}'),
])
def test_issue15_finding12_a_lone_surrogate_is_a_400_not_a_500(client, route, body):
    r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]
    ok = client.post(route, content=body.replace("\\ud800", "\\ud83d\\ude00").replace("\\udc00", "é")
                     .replace("\\udfff", "é"), headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text  # a real pair (an emoji) is text

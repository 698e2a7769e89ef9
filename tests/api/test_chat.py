"""/v1/chat/completions on the FakeEngine."""


def test_chat_uses_template_and_answers(client):
    r = client.post("/v1/chat/completions", json={
        "model": "alpha", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "[alpha] ief\n<user>hi\n<assistant>"}
    assert choice["finish_reason"] == "stop"
    prompt = client.engine.tokenizer.decode(client.engine.submitted[-1].prompt_ids)
    assert prompt == "<system>be brief\n<user>hi\n<assistant>"
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_content_parts_are_joined(client):
    r = client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}]})
    assert r.status_code == 200
    assert client.engine.tokenizer.decode(client.engine.submitted[-1].prompt_ids) == "<user>ab\n<assistant>"


def test_max_completion_tokens_wins(client):
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "max_tokens": 50,
                                                  "max_completion_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 4


def test_chat_logprobs(client):
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "max_tokens": 2, "logprobs": True,
                                                  "top_logprobs": 2, "messages": [{"role": "user", "content": "x"}]})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["[", "b"]
    assert content[0]["bytes"] == [ord("[")]
    assert len(content[0]["top_logprobs"]) == 2


def test_chat_n(client):
    r = client.post("/v1/chat/completions", json={"model": "beta", "n": 3, "max_tokens": 5,
                                                  "messages": [{"role": "user", "content": "x"}]})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert r.json()["usage"]["completion_tokens"] == 15

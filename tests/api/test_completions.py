"""/v1/completions on the FakeEngine: fields reach the engine, results come back in OpenAI's shape."""

import pytest


def test_completion_base_model(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hello there", "max_tokens": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "fake-model"
    [choice] = body["choices"]
    assert choice["text"] == "[base] hello there"
    assert choice["finish_reason"] == "stop"
    assert choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": len("[base] hello there") + 1,
                             "total_tokens": 11 + len("[base] hello there") + 1}


@pytest.mark.parametrize("model,adapter", [("alpha", "alpha"), ("fake-model:beta", "beta")])
def test_completion_names_adapter(client, model, adapter):
    r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 50})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == f"[{adapter}] x"
    assert client.engine.submitted[-1].adapter == adapter


def test_default_max_tokens_is_16(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "a long enough prompt here"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 16
    assert client.engine.submitted[-1].params.max_tokens == 16


def test_max_tokens_cuts_with_length(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "abc", "max_tokens": 3})
    choice = r.json()["choices"][0]
    assert choice == {"index": 0, "text": "[ba", "finish_reason": "length", "logprobs": None}


def test_stop_string_not_returned(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hello there", "max_tokens": 50,
                                             "stop": ["the"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == "[base] hello "
    assert choice["finish_reason"] == "stop"


def test_list_of_prompts_and_n(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": ["one", "two"], "n": 2,
                                             "max_tokens": 40, "seed": 7, "temperature": 0.5})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == ["[base] one", "[base] one", "[base] two", "[base] two"]
    seeds = [q.params.seed for q in client.engine.submitted[-4:]]
    assert seeds == [7, 8, 9, 10]
    assert r.json()["usage"]["prompt_tokens"] == 6  # each prompt counted once, not per choice


def test_sampling_fields_reach_engine(client):
    r = client.post("/v1/completions", json={
        "model": "fake-model", "prompt": "x", "max_tokens": 20, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
        "seed": 3, "min_tokens": 4, "ignore_eos": True, "repetition_penalty": 1.2, "presence_penalty": 0.5,
        "frequency_penalty": 0.25, "user": "u1"})
    assert r.status_code == 200, r.text
    p = client.engine.submitted[-1].params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.min_tokens, p.ignore_eos) == (0.7, 0.9, 5, 3, 4, True)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.5, 0.25)
    # ignore_eos: generation runs to max_tokens
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 20


def test_min_tokens_defers_eos(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 40,
                                             "min_tokens": 12})
    assert r.json()["usage"]["completion_tokens"] >= 12


def test_logprobs_shape(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["[", "b", "a"]
    assert lp["token_logprobs"] == [-0.25, -0.25, -0.25]
    assert lp["text_offset"] == [0, 1, 2]
    assert len(lp["top_logprobs"]) == 3 and len(lp["top_logprobs"][0]) == 2
    assert client.engine.submitted[-1].params.logprobs == 2


def test_token_id_prompt(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": [104, 105], "max_tokens": 30})
    assert r.json()["choices"][0]["text"] == "[base] hi"


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 5,
                                             "some_future_field": {"a": 1}})
    assert r.status_code == 200

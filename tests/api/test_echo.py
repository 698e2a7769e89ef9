"""Completions `echo` and prompt logprobs at the API (FakeEngine, whose prompt logprobs are
scripted: token i + 1 gets -0.5 * (i + 1)). The engine's values: tests/engine/test_prompt_logprobs.py."""

import json

import pytest


def post(client, **body):
    r = client.post("/v1/completions", json={"model": "fake-model", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_puts_the_prompt_before_the_text(client):
    [c] = post(client, prompt="hello", max_tokens=50, echo=True)["choices"]
    assert c["text"] == "hello[base] hello"
    assert client.engine.submitted[-1].params.prompt_logprobs is None  # no logprobs asked: none computed


def test_lm_eval_loglikelihood_request_shape(client):
    """What lm-evaluation-harness' local-completions sends for every multiple-choice question."""
    ids = list(b"Q: 2+2? A: 4")
    body = post(client, prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0.0)
    [c] = body["choices"]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][0] == "Q"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == [-0.5 * (i + 1) for i in range(len(ids) - 1)]
    # Each dict holds the token itself, so lm-eval's greedy check (token == max of the dict) works.
    for tok, lpv, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[tok] == lpv and max(top.values()) == lpv
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert c["text"] == "Q: 2+2? A: 4["
    assert client.engine.submitted[-1].params.prompt_logprobs == 1


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client):
    body = post(client, prompt="abc", max_tokens=0, echo=True, logprobs=0)
    [c] = body["choices"]
    assert c["text"] == "abc" and c["finish_reason"] == "length"
    assert c["logprobs"]["tokens"] == ["a", "b", "c"] and c["logprobs"]["token_logprobs"] == [None, -0.5, -1.0]
    assert body["usage"]["completion_tokens"] == 0


def test_echo_with_several_prompts_and_choices(client):
    body = post(client, prompt=["ab", "cd"], max_tokens=3, echo=True, n=2)
    assert [c["text"] for c in body["choices"]] == ["ab[ba", "ab[ba", "cd[ba", "cd[ba"]


def test_streamed_echo_matches_the_whole_answer(client):
    whole = post(client, prompt="hey", max_tokens=6, echo=True, logprobs=1, seed=1)["choices"][0]
    with client.stream("POST", "/v1/completions", json={"model": "fake-model", "prompt": "hey", "max_tokens": 6,
                                                        "echo": True, "logprobs": 1, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["text"].startswith("hey")
    assert "".join(c["text"] for c in choices) == whole["text"]
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offsets = [o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "xyz", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "xyz"}], "max_tokens": 2}),
])
def test_vllm_prompt_logprobs_field(client, route, body):
    r = client.post(route, json={"model": "fake-model", "prompt_logprobs": 1, **body})
    assert r.status_code == 200, r.text
    out = r.json()
    pl = out["choices"][0]["prompt_logprobs"] if route == "/v1/completions" else out["prompt_logprobs"]
    ids = client.engine.submitted[-1].prompt_ids
    assert len(pl) == len(ids) and pl[0] is None
    assert pl[1][str(ids[1])] == {"logprob": -0.5, "rank": 1, "decoded_token": chr(ids[1])}


def test_prompt_logprobs_are_capped(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "prompt_logprobs": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"

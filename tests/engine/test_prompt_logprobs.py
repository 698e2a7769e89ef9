"""Prompt logprobs in the real engine (tiny random Llama): from the prefill's own forward, chunked
and past a cached prefix, equal to log_softmax of a plain PEFT forward of the same adapter."""

import asyncio

import pytest
import torch

from server.config import load_config
from server.engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import start_engine

TEXT = "the quick brown fox jumps over the lazy dog; hello world, this is a tiny tokenizer for tests " * 2


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_store, tmp_path_factory):
    # Chunks of 16 tokens: a prompt of ~50 is prefilled over several steps.
    eng = start_engine(tiny_model_dir, tiny_store, tmp_path_factory.mktemp("cache"), ("alpha",),
                       **{"engine.max_prefill_chunk": 16})
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tiny_store):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, tiny_store / "alpha", adapter_name="alpha").eval()

    def logprobs(ids, adapter):
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    logits = peft(input_ids=torch.tensor([ids])).logits[0]
            else:
                logits = peft(input_ids=torch.tensor([ids])).logits[0]
        return logits.log_softmax(-1)
    return logprobs


def run(engine, *requests):
    async def one(r):
        return [ev async for ev in engine.submit(r)]

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))
    return asyncio.run(main())


@pytest.mark.parametrize("adapter", [None, "alpha"])
def test_prompt_logprobs_equal_a_plain_peft_forward(engine, oracle, adapter):
    ids = engine.tokenizer.encode(TEXT)
    assert len(ids) > 40  # several chunks of 16
    # The same prompt first without prompt logprobs, so its blocks sit in the prefix cache.
    warm = GenerationRequest(f"warm-{adapter}", ids, SamplingParams(max_tokens=2, temperature=0.0), adapter)
    scored = GenerationRequest(f"pl-{adapter}", ids, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2),
                               adapter)
    other = GenerationRequest(f"other-{adapter}", ids[:9], SamplingParams(max_tokens=4, temperature=0.0), "alpha")
    run(engine, warm)
    events, _ = run(engine, scored, other)
    lps = events[0].prompt_logprobs
    ref = oracle(ids, adapter)
    assert len(lps) == len(ids) - 1
    for i, lp in enumerate(lps):
        row, tok = ref[i], ids[i + 1]
        assert lp.token_id == tok
        assert abs(lp.logprob - float(row[tok])) < 1e-4, i
        assert lp.rank == int((row > row[tok]).sum()) + 1
        assert [t for t, _, _ in lp.top] == row.topk(2).indices.tolist()
        assert lp.token == engine.tokenizer.tok.decode([tok])
    assert all(ev.prompt_logprobs is None for ev in events[1:])
    assert sum(len(ev.token_ids) for ev in events) == 3


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(engine, oracle):
    ids = engine.tokenizer.encode("hello world, this is a tiny tokenizer")
    [events] = run(engine, GenerationRequest("zero", ids, SamplingParams(max_tokens=0, prompt_logprobs=0)))
    [ev] = events
    assert ev.finish_reason == "length" and ev.token_ids == [] and ev.text == ""
    assert ev.prompt_tokens == len(ids) and ev.completion_tokens == 0
    ref = oracle(ids, None)
    assert [round(lp.logprob, 4) for lp in ev.prompt_logprobs] == [round(float(ref[i, t]), 4)
                                                                    for i, t in enumerate(ids[1:])]
    assert all(lp.top == () for lp in ev.prompt_logprobs)
    # The engine is free again: nothing is left running.
    assert engine.stats().running == 0


def test_echo_logprobs_through_the_api_equal_peft(tiny_model_dir, tiny_store, tmp_path, oracle):
    """lm-eval's request shape on the real engine: the prompt's logprobs are PEFT's."""
    import shutil

    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.conftest import wait_ready

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    cfg = load_config(environ={"LORAPLEX_ADAPTERS__DIR": str(store), "LORAPLEX_MODEL__MODEL": str(tiny_model_dir),
                               "LORAPLEX_MODEL__DTYPE": "float32"})
    with TestClient(create_app(cfg)) as c:
        wait_ready(c, 120)
        ids = c.post("/tokenize", json={"prompt": "what is the capital of France? Paris"}).json()["tokens"]
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": [ids], "max_tokens": 1, "logprobs": 1,
                                             "echo": True, "temperature": 0})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
    ref = oracle(ids, "alpha")
    assert lp["token_logprobs"][0] is None
    got = lp["token_logprobs"][1:len(ids)]
    assert max(abs(g - float(ref[i, t])) for i, (g, t) in enumerate(zip(got, ids[1:]))) < 1e-4
    assert len(lp["tokens"]) == len(ids) + 1

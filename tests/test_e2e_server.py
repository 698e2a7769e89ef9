"""`loraplex serve` as a real process on a real port, driven by the official openai client."""

import shutil

import httpx
import openai
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    shutil.copytree(tiny_store, tmp / "store")
    srv = ServerProcess(["--model", str(tiny_model_dir), "--adapters-dir", str(tmp / "store")],
                        env={"LORAPLEX_MODEL__CACHE_DIR": str(tmp / "cache"), "LORAPLEX_MODEL__DTYPE": "float32"},
                        log_path=tmp / "server.log")
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-llama", "alpha", "beta"]


@pytest.mark.parametrize("model", ["tiny-llama", "alpha", "tiny-llama:beta"])
def test_completion_stream_matches_non_stream(client, model):
    kw = dict(model=model, prompt="hello world", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []


def test_adapters_give_different_answers(client):
    texts = {m: client.completions.create(model=m, prompt="the quick", max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
             for m in ("tiny-llama", "alpha", "beta")}
    assert len(set(texts.values())) == 3


def test_chat_stream_and_not(client):
    msgs = [{"role": "user", "content": "what is the capital of France?"}]
    full = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=8, temperature=0, seed=1)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=8, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_seed_reproducible_over_http(client):
    kw = dict(model="beta", prompt="hello", max_tokens=12, temperature=1.2, seed=11, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"


def test_bad_request_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=-1)


def test_disconnect_mid_stream_keeps_server_healthy(server, client):
    payload = {"model": "alpha", "prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=payload, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    out = client.completions.create(model="alpha", prompt="hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_metrics_from_the_real_engine(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="alpha", prompt="hello", max_tokens=4, temperature=0)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    steps = [s.value for s in fams["loraplex_batch_size"].samples if s.name == "loraplex_batch_size_count"]
    assert steps and steps[0] >= 4
    assert any(s.value > 0 for s in fams["loraplex_queue_time_seconds"].samples if s.name.endswith("_count"))


def test_concurrent_staggered_mixed_batch_equals_peft(server, tiny_model_dir, tiny_store):
    """Through HTTP: base, two adapters and a blend served concurrently with staggered arrivals;
    every greedy answer equals PEFT's own generate for that adapter alone (fp32)."""
    import asyncio

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    blend = {"name": "half-half", "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}],
             "combination_type": "cat"}
    r = httpx.post(server.url + "/admin/blends", json=blend)
    assert r.status_code in (200, 201), r.text

    prompts = ["hello world", "the quick brown fox", "what is the capital of France?"]
    jobs = [(p, m) for p in prompts for m in ("tiny-llama", "alpha", "beta", "half-half")]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def one(i, prompt, model):
                await asyncio.sleep(0.03 * i)  # staggered: later requests join a running batch
                r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 10,
                                                          "temperature": 0, "ignore_eos": True})
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(jobs)))
    served = asyncio.run(main())

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    ref = PeftModel.from_pretrained(base, tiny_store / "alpha", adapter_name="alpha")
    ref.load_adapter(tiny_store / "beta", adapter_name="beta")
    ref.add_weighted_adapter(["alpha", "beta"], [0.5, 0.5], "half-half", combination_type="cat")
    for (prompt, model), text in zip(jobs, served):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            if model == "tiny-llama":
                with ref.disable_adapter():
                    out = ref.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
            else:
                ref.set_adapter(model)
                out = ref.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), (prompt, model)

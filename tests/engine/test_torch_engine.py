"""The real engine on a tiny random Llama: greedy equals transformers/PEFT, stops, seeds, aborts."""

import asyncio
import time

import pytest
import torch

from server.engine.types import GenerationRequest, SamplingParams

PROMPTS = ["hello world", "the quick brown fox", "what is the capital of France?"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_store):
    """transformers + PEFT on their own: the oracle."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None  # compare fixed-length runs
    peft = PeftModel.from_pretrained(base, tiny_store / "alpha", adapter_name="alpha")
    peft.load_adapter(tiny_store / "beta", adapter_name="beta")
    peft.eval()

    def generate(prompt_ids, adapter, n):
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
            else:
                peft.set_adapter(adapter)
                out = peft.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()
    return generate


def run(engine, *requests):
    async def one(req):
        events = [ev async for ev in engine.submit(req)]
        return {"text": "".join(e.text for e in events), "ids": [t for e in events for t in e.token_ids],
                "finish": events[-1].finish_reason, "logprobs": [lp for e in events for lp in e.logprobs]}

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))
    return asyncio.run(main())


def req(engine, rid, prompt, adapter=None, **params):
    params = {"max_tokens": 12, "temperature": 0.0, **params}
    return GenerationRequest(rid, engine.tokenizer.encode(prompt), SamplingParams(**params), adapter)


@pytest.mark.parametrize("adapter", [None, "alpha", "beta"])
def test_greedy_equals_reference_generate(engine, reference, adapter):
    for i, prompt in enumerate(PROMPTS):
        r = req(engine, f"g-{adapter}-{i}", prompt, adapter, ignore_eos=True)
        [out] = run(engine, r)
        assert out["ids"] == reference(r.prompt_ids, adapter, 12), (prompt, adapter)
        assert out["finish"] == "length"


def test_adapters_change_the_output(engine):
    outs = run(engine, *(req(engine, f"c-{a}", PROMPTS[0], a, ignore_eos=True) for a in (None, "alpha", "beta")))
    assert len({tuple(o["ids"]) for o in outs}) == 3


def test_mixed_batch_equals_solo_runs(engine):
    combos = [(p, a) for p in PROMPTS for a in (None, "alpha", "beta")]
    solo = [run(engine, req(engine, f"s-{i}", p, a, ignore_eos=True))[0]["ids"] for i, (p, a) in enumerate(combos)]
    mixed = run(engine, *(req(engine, f"m-{i}", p, a, ignore_eos=True, max_tokens=12 - i % 4)
                          for i, (p, a) in enumerate(combos)))
    for i, (s, m) in enumerate(zip(solo, mixed)):
        assert m["ids"] == s[: 12 - i % 4], combos[i]


def test_greedy_is_deterministic(engine):
    a, b = run(engine, req(engine, "d1", PROMPTS[1]), req(engine, "d2", PROMPTS[1]))
    assert a["ids"] == b["ids"] and a["text"] == b["text"]


def test_max_tokens(engine):
    [out] = run(engine, req(engine, "mt", PROMPTS[0], max_tokens=5, ignore_eos=True))
    assert len(out["ids"]) == 5 and out["finish"] == "length"


def test_stop_string_cuts_and_is_not_returned(engine):
    [full] = run(engine, req(engine, "full", PROMPTS[2], max_tokens=20, ignore_eos=True))
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop from {text!r}"
    [cut] = run(engine, req(engine, "cut", PROMPTS[2], max_tokens=20, ignore_eos=True, stop=(stop,)))
    assert cut["finish"] == "stop"
    assert cut["text"] == text[: text.index(stop)]
    # The stop string is found on the output thread, which then ends the request in the engine.
    for _ in range(100):
        if not engine._live and not engine._active:
            break
        time.sleep(0.02)
    assert not engine._live and not engine._active


def test_seed_gives_same_sample(engine):
    outs = run(engine, *(req(engine, f"s{i}", PROMPTS[0], temperature=1.5, seed=s, max_tokens=16, ignore_eos=True)
                         for i, s in enumerate([5, 5, 6])))
    assert outs[0]["ids"] == outs[1]["ids"]
    assert outs[0]["ids"] != outs[2]["ids"]


def test_logprobs_match_the_model(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    r = req(engine, "lp", PROMPTS[0], max_tokens=1, logprobs=3)
    [out] = run(engine, r)
    [lp] = out["logprobs"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([r.prompt_ids])).logits[0, -1].log_softmax(-1)
    assert lp.token_id == int(ref.argmax())
    assert abs(lp.logprob - float(ref.max())) < 1e-4
    assert [t for t, _, _ in lp.top] == ref.topk(3).indices.tolist()
    # Token texts are filled in on the output thread.
    assert lp.token == engine.tokenizer.token_text(lp.token_id)
    assert [t for _, t, _ in lp.top] == [engine.tokenizer.token_text(i) for i, _, _ in lp.top]


def test_leaving_early_aborts_the_request(engine):
    async def main():
        stream = engine.submit(req(engine, "ab", PROMPTS[0], max_tokens=200, ignore_eos=True))
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        for _ in range(200):
            if "ab" not in engine._active:
                break
            await asyncio.sleep(0.01)
        return got
    got = asyncio.run(main())
    assert len(got) == 3
    assert "ab" not in engine._active


def test_unknown_adapter_fails_only_its_request(engine):
    from server.errors import NotFound

    async def main():
        bad = engine.submit(req(engine, "bad", PROMPTS[0], "ghost"))
        good = engine.submit(req(engine, "good", PROMPTS[0], "alpha", max_tokens=3))
        with pytest.raises(NotFound):
            async for _ in bad:
                pass
        return [ev async for ev in good]
    events = asyncio.run(main())
    assert events[-1].finish_reason in ("length", "stop")


def test_requests_join_a_running_batch(engine):
    """Continuous batching: late arrivals join mid-flight, finish before the long request, and every
    output equals its solo run (fp32)."""
    combos = [(PROMPTS[0], None, 40), (PROMPTS[1], "alpha", 6), (PROMPTS[2], "beta", 6), (PROMPTS[1], None, 6)]
    solo = [run(engine, req(engine, f"solo-{i}", p, a, ignore_eos=True, max_tokens=n))[0]["ids"]
            for i, (p, a, n) in enumerate(combos)]

    async def main():
        order = []

        async def consume(i, stream):
            ids = []
            async for ev in stream:
                ids += ev.token_ids
            order.append(i)
            return ids
        p, a, n = combos[0]
        first = asyncio.create_task(consume(0, engine.submit(req(engine, "long", p, a, ignore_eos=True, max_tokens=n))))
        while not engine.stats().running:  # wait until the long request is running
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        late = [asyncio.create_task(consume(i, engine.submit(req(engine, f"late-{i}", p, a, ignore_eos=True,
                                                                     max_tokens=n))))
                for i, (p, a, n) in enumerate(combos) if i > 0]
        outs = await asyncio.gather(first, *late)
        return outs, order
    outs, order = asyncio.run(main())
    assert outs == solo
    assert order[-1] == 0, f"the long request should finish last, got {order}"


def test_issue15_finding2_a_poisoned_slot_changes_no_other_row(engine):
    """Weights with inf and NaN put in a slot below every validator: the base and clean-adapter rows
    in the same batches are token for token what they are without it, greedy and sampled; the
    poisoned rows fail alone."""
    from server.lora.slots import Prepared

    runner = engine._runner
    clean = runner.slots.loaded["alpha"]
    poisoned = {}
    for path, (a, b) in clean.weights.items():
        a, b = a.clone(), b.clone()
        a[0, 0], b[0, 0], b[-1, -1] = float("inf"), float("nan"), float("-inf")
        poisoned[path] = (a, b)
    runner.slots.install("poison", Prepared(poisoned, clean.files), identity="poison")
    try:
        def batch(with_poison):
            reqs = []
            for i, prompt in enumerate(PROMPTS):
                reqs.append(req(engine, f"b{i}-{with_poison}", prompt, None, ignore_eos=True))
                reqs.append(req(engine, f"a{i}-{with_poison}", prompt, "beta", ignore_eos=True, temperature=1.0,
                                seed=i))
                if with_poison:
                    reqs.append(req(engine, f"p{i}", prompt, "poison", ignore_eos=True, temperature=1.0, seed=i))
            return reqs

        async def collect(reqs):
            async def one(r):
                try:
                    return [t for ev in [e async for e in engine.submit(r)] for t in ev.token_ids]
                except Exception as e:  # the poisoned rows' error
                    return e
            return await asyncio.gather(*(one(r) for r in reqs))

        quiet = asyncio.run(collect(batch(False)))
        mixed = asyncio.run(collect(batch(True)))
        clean_mixed = [x for r, x in zip(batch(True), mixed) if not r.request_id.startswith("p")]
        assert clean_mixed == quiet
        poisoned_out = [x for r, x in zip(batch(True), mixed) if r.request_id.startswith("p")]
        assert all(isinstance(x, Exception) for x in poisoned_out), poisoned_out
        # The tenant's adapter did it: a 422 naming the cause, not a server error.
        from server.errors import InvalidAdapter
        assert all(isinstance(x, InvalidAdapter) and x.code == "non_finite_output" for x in poisoned_out)
        assert asyncio.run(collect(batch(False))) == quiet  # and nothing lingers in the KV cache
    finally:
        asyncio.run(engine.unload_adapter("poison"))


def test_a_failed_step_tells_clients_only_the_request_id_and_logs_the_cause(engine, monkeypatch, caplog):
    """Issue 18: engine errors reached clients as `type(e).__name__: e` (paths, shapes, library
    text). Now each request gets a generic engine_error naming its id; the detail is logged."""
    from server.errors import LoraplexError

    real = engine._runner.run

    def broken(items):
        raise RuntimeError("secret detail: /srv/weights/shard-3 shape (7, 9)")
    monkeypatch.setattr(engine._runner, "run", broken)

    async def one(rid):
        try:
            return [e async for e in engine.submit(req(engine, rid, "hello world"))]
        except LoraplexError as e:
            return e
    with caplog.at_level("ERROR", logger="loraplex.engine"):
        async def both():
            return await asyncio.wait_for(asyncio.gather(one("r-1"), one("r-2")), 60)
        errors = asyncio.run(both())
    monkeypatch.setattr(engine._runner, "run", real)
    for rid, err in zip(("r-1", "r-2"), errors):
        assert isinstance(err, LoraplexError) and err.code == "engine_error"
        assert rid in err.message and "secret" not in err.message
    assert "secret detail" in caplog.text
    async def after():
        return [t for ev in [e async for e in engine.submit(req(engine, "after", "hello world"))] for t in ev.token_ids]
    assert asyncio.run(after())  # and it serves on


def test_redteam_an_adapter_whose_logits_overflow_to_inf_fails_alone(engine, monkeypatch):
    """Finite weights can overflow to +inf logits (not NaN): the NaN check let such a row through
    to the sampler, whose softmax then failed the whole step. Now any non-finite row fails alone
    (422 non_finite_output) and the base and other-adapter rows beside it are unchanged."""
    from server.errors import InvalidAdapter

    real = engine._runner.run
    poisoned = engine._runner.slots.slot_of["beta"]

    def overflowing(items):
        out = real(items).clone()   # an inference tensor: edited as a copy
        rows = [it for it in items if it.rows]
        assert all(it.rows == 1 for it in rows)   # short prompts: one sampled row per sequence
        for j, it in enumerate(rows):
            if it.slot == poisoned:
                out[j] = float("inf")
        return out

    async def one(r):
        try:
            return [t for ev in [e async for e in engine.submit(r)] for t in ev.token_ids]
        except InvalidAdapter as e:
            return e

    async def run(reqs):
        return await asyncio.wait_for(asyncio.gather(*(one(r) for r in reqs)), 60)

    def batch(tag):
        return [req(engine, f"base-{tag}", "hello world", None, ignore_eos=True, temperature=1.0, seed=1),
                req(engine, f"alpha-{tag}", "hello world", "alpha", ignore_eos=True),
                req(engine, f"beta-{tag}", "hello world", "beta", ignore_eos=True, temperature=1.0)]
    quiet = asyncio.run(run(batch("q")[:2]))
    monkeypatch.setattr(engine._runner, "run", overflowing)
    base, alpha, beta = asyncio.run(run(batch("p")))
    monkeypatch.setattr(engine._runner, "run", real)
    assert isinstance(beta, InvalidAdapter) and beta.code == "non_finite_output"
    assert [base, alpha] == quiet

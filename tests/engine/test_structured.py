"""Structured outputs in the real engine on a tiny random Llama: every constraint kind in one batch
with unconstrained rows and rows of other adapters; the masks equal xgrammar's own acceptance."""

import asyncio
import dataclasses
import json
import re

import pytest
import torch

from server.config import load_config
from server.engine.grammar import Grammars, Structured, apply_masks
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import InvalidRequest

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "ok", "n"], "additionalProperties": False}


def run_all(engine, specs):
    """specs: (request id, prompt, adapter, Structured | None, params); all submitted together."""
    async def one(rid, prompt, adapter, s, params):
        grammar = await engine.compile_structured(s) if s is not None else None
        r = GenerationRequest(rid, engine.tokenizer.encode(prompt),
                              SamplingParams(**{"max_tokens": 48, "temperature": 0.0, **params}), adapter,
                              grammar=grammar)
        events = [ev async for ev in engine.submit(r)]
        return "".join(e.text for e in events), events[-1].finish_reason

    async def main():
        return await asyncio.gather(*(one(*s) for s in specs))
    return dict(zip([s[0] for s in specs], asyncio.run(main())))


def test_every_constraint_kind_in_one_mixed_batch(engine):
    import jsonschema

    tok = engine.tokenizer.tok
    quote, close = tok.convert_tokens_to_ids('"'), tok.convert_tokens_to_ids("}")
    specs = [
        ("schema-base", "hello world", None, Structured("json_schema", json.dumps(SCHEMA)), {}),
        ("schema-alpha", "hello world", "alpha", Structured("json_schema", json.dumps(SCHEMA)), {"temperature": 1.0,
                                                                                               "seed": 3}),
        # any object: biased toward closing strings and the object, so a random model ends it in budget
        ("object-beta", "the quick", "beta", Structured("json_object"),
         {"logit_bias": ((quote, 6.0), (close, 8.0))}),
        ("regex", "the capital", "alpha", Structured("regex", r"(yes|no)-[0-9]{2}"), {"temperature": 1.0, "seed": 1}),
        ("choice", "what is", None, Structured("choice", json.dumps(["Paris", "not Paris"])), {}),
        ("grammar", "adapters", "beta", Structured("grammar", 'root ::= "a" ("b" | "c")+ "d"'),
         {"logit_bias": ((tok.convert_tokens_to_ids("d"), 3.0),)}),
        ("free-base", "hello world", None, None, {"max_tokens": 12, "ignore_eos": True}),
        ("free-alpha", "hello world", "alpha", None, {"max_tokens": 12, "ignore_eos": True}),
    ]
    out = run_all(engine, specs)
    for rid in ("schema-base", "schema-alpha"):
        text, finish = out[rid]
        assert finish == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMA)
    text, finish = out["object-beta"]
    assert finish == "stop" and isinstance(json.loads(text), dict), text
    assert out["regex"][1] == "stop" and re.fullmatch(r"(yes|no)-[0-9]{2}", out["regex"][0])
    assert out["choice"] in {("Paris", "stop"), ("not Paris", "stop")}
    assert out["grammar"][1] == "stop" and re.fullmatch(r"a[bc]+d", out["grammar"][0])
    # Unconstrained rows in the same batch are what they are alone.
    alone = run_all(engine, specs[-2:])
    assert out["free-base"] == alone["free-base"] and out["free-alpha"] == alone["free-alpha"]


def test_a_constraint_that_does_not_compile_is_an_invalid_request(engine):
    for s in (Structured("json_schema", '{"type": "objectx"}', param="response_format.json_schema.schema"),
              Structured("regex", "(ab", param="guided_regex"), Structured("grammar", "root ::= nothing",
                                                                          param="guided_grammar")):
        with pytest.raises(InvalidRequest) as e:
            asyncio.run(engine.compile_structured(s))
        assert e.value.param == s.param and "does not compile" in e.value.message


def test_masks_equal_xgrammar_acceptance_token_by_token(tiny_model_dir):
    """The fast path (one bitmask for the batch, applied in place) against the plain reference:
    each token tried with accept_token and rolled back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = Grammars.from_tokenizer(tok, len(tok), [tok.eos_token_id])
    compiled = g.compile(Structured("json_schema", json.dumps(SCHEMA)))
    path = tok.encode(json.dumps({"colour": "red", "ok": True, "n": 3}), add_special_tokens=False)
    fast, ref = g.matcher(compiled), g.matcher(compiled)
    for tid in path + [tok.eos_token_id]:
        logits = torch.zeros(3, len(tok))
        apply_masks(logits, [None, fast, None])
        allowed = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
        expect = set()
        for t in range(len(tok)):
            if ref.accept_token(t):
                expect.add(t)
                ref.rollback(1)
        assert allowed == expect and tid in allowed
        assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
        assert fast.accept_token(tid) and ref.accept_token(tid)
    assert fast.is_terminated()


TEMPLATE = __import__("pathlib").Path(__file__).resolve().parents[2] / "deploy" / "templates" / "hermes-tools.jinja"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
                                                                                         "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
             "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}]


def test_forced_tool_calls_on_the_real_engine_validate(tiny_model_dir, tiny_store, tmp_path):
    """The shipped tool template with the real engine: a named call and "required" calls come back
    as tool_calls whose arguments validate against the functions' schemas."""
    import shutil

    import jsonschema
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.conftest import wait_ready

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    cfg = load_config(environ={"LORAPLEX_ADAPTERS__DIR": str(store), "LORAPLEX_MODEL__MODEL": str(tiny_model_dir),
                               "LORAPLEX_MODEL__DTYPE": "float32", "LORAPLEX_MODEL__CHAT_TEMPLATE": str(TEMPLATE),
                               "LORAPLEX_MODEL__TOOL_PARSER": "hermes", "LORAPLEX_MODEL__CONTEXT_LENGTH": "2048"})
    ask = [{"role": "user", "content": "weather in Paris?"}]
    with TestClient(create_app(cfg)) as c:
        wait_ready(c, 120)
        prompt = c.post("/tokenize", json={"messages": ask, "return_token_strs": False}).json()
        for body in ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                     {"tool_choice": "required", "parallel_tool_calls": False}):
            r = c.post("/v1/chat/completions", json={"model": "alpha", "messages": ask, "tools": TOOLS,
                                                     "max_tokens": 120, "temperature": 0, **body})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            [call] = choice["message"]["tool_calls"]
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        # The template put the tools in the prompt: it is longer than the messages alone.
        with_tools = c.post("/v1/chat/completions", json={"model": "alpha", "messages": ask, "tools": TOOLS,
                                                          "tool_choice": "none", "max_tokens": 1}).json()
        assert with_tools["usage"]["prompt_tokens"] > prompt["count"] + 50


def test_the_tool_template_renders_tools_and_history(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATE.read_text()
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
         {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
        tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call")
    tools_block = text[text.index("<tools>\n"):text.index("</tools>")]
    assert [json.loads(line) for line in tools_block.splitlines()[1:]] == TOOLS
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_redteam_a_grammar_that_dead_ends_fails_its_row_alone(engine):
    """`root ::= root` compiles yet allows no token: that row ends with a 400-class error, the rows
    beside it (greedy, sampled with a seed, another adapter) get exactly the tokens they get alone."""
    async def main():
        grammar = await engine.compile_structured(Structured("grammar", "root ::= root"))
        dead = GenerationRequest("dead", engine.tokenizer.encode("hi"), SamplingParams(max_tokens=8), "alpha",
                                 grammar=grammar)

        async def events(r):
            try:
                return [e async for e in engine.submit(r)]
            except InvalidRequest as e:
                return e
        free = [GenerationRequest(f"free-{i}", engine.tokenizer.encode("hello world"),
                                  SamplingParams(max_tokens=12, ignore_eos=True, **p), a)
                for i, (a, p) in enumerate([(None, {"temperature": 0.0}), ("beta", {"temperature": 1.0, "seed": 4})])]
        together = await asyncio.gather(events(dead), *(events(r) for r in free))
        alone = [await events(dataclasses.replace(r, request_id=r.request_id + "-alone")) for r in free]
        return together, alone
    (dead, *together), alone = asyncio.run(main())
    assert isinstance(dead, InvalidRequest) and dead.code == "no_allowed_token"
    toks = lambda evs: [t for e in evs for t in e.token_ids]  # noqa: E731
    assert [toks(e) for e in together] == [toks(e) for e in alone]

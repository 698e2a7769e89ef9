"""Structured outputs at the API (FakeEngine): which field becomes which constraint, refusals, and
the openai client's `parse` on a reply that holds JSON. Enforcement is the engine's:
tests/engine/test_structured.py."""

import json

import openai
import pytest
from pydantic import BaseModel

from server.engine.grammar import Structured

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "where?"}], "max_tokens": 64}


@pytest.mark.parametrize("fields,expect", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}}},
     Structured("json_schema", json.dumps(SCHEMA), param="response_format.json_schema.schema")),
    ({"response_format": {"type": "json_object"}}, Structured("json_object", param="response_format")),
    ({"guided_json": SCHEMA}, Structured("json_schema", json.dumps(SCHEMA), param="guided_json")),
    ({"guided_json": json.dumps(SCHEMA)}, Structured("json_schema", json.dumps(SCHEMA), param="guided_json")),
    ({"guided_regex": "[a-z]+"}, Structured("regex", "[a-z]+", param="guided_regex")),
    ({"guided_choice": ["a", "b"]}, Structured("choice", '["a", "b"]', param="guided_choice")),
    ({"guided_grammar": 'root ::= "x"'}, Structured("grammar", 'root ::= "x"', param="guided_grammar")),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": False}},
     Structured("json_schema", json.dumps(SCHEMA), any_whitespace=True, param="structured_outputs.json")),
    ({"structured_outputs": {"choice": ["x", "y"]}},
     Structured("choice", '["x", "y"]', param="structured_outputs.choice")),
    ({"structured_outputs": {"json_object": True}}, Structured("json_object", param="structured_outputs.json_object")),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_each_field_becomes_its_constraint(client, fields, expect, route):
    base = CHAT if route == "/v1/chat/completions" else {"model": "alpha", "prompt": "where?", "max_tokens": 8}
    r = client.post(route, json={**base, **fields, "n": 2})
    assert r.status_code == 200, r.text
    assert client.engine.structured[-1] == expect
    first, second = client.engine.submitted[-2:]
    assert first.grammar is not None and second.grammar is first.grammar  # compiled once for all choices


def test_unconstrained_requests_carry_no_grammar(client):
    assert client.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}}).status_code == 200
    assert client.engine.submitted[-1].grammar is None and client.engine.structured == []


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_grammar": "root ::= nothing"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": [""]}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"guided_json": SCHEMA, "ignore_eos": True}, "ignore_eos"),
    ({"guided_json": SCHEMA, "min_tokens": 3}, "min_tokens"),
    ({"guided_json": {"type": "object", "description": "x" * 70000}}, "guided_json"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])
def test_constraints_that_cannot_be_served_are_400s_naming_the_field(client, fields, param):
    r = client.post("/v1/chat/completions", json={**CHAT, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert client.engine.submitted == []


class City(BaseModel):
    city: str
    population: int


@pytest.mark.parametrize("model", ["fake-model", "alpha"])
def test_openai_parse_returns_the_parsed_object(make_client, model):
    reply = json.dumps({"city": "Paris", "population": 2100000})
    c = make_client(script=lambda req, prompt: reply)
    api = openai.OpenAI(base_url=str(c.base_url) + "/v1", api_key="x", http_client=c)
    done = api.chat.completions.parse(model=model, messages=[{"role": "user", "content": "where?"}],
                                      response_format=City, max_tokens=200)
    assert done.choices[0].message.parsed == City(city="Paris", population=2100000)
    s = c.engine.structured[-1]
    assert s.kind == "json_schema" and json.loads(s.value)["properties"]["population"]["type"] == "integer"

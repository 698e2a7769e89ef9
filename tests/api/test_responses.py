"""POST /v1/responses driven by the openai client (FakeEngine): text, adapters, instructions,
structured outputs, function tools, streaming events, and what is refused."""

import json
from typing import get_type_hints

import openai
import pytest
from openai.types.responses import response_create_params

from server.api import fields
from server.api.responses import ResponsesRequest

TOOL = {"type": "function", "name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def api_for(client):
    return openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="x", http_client=client)


@pytest.mark.parametrize("model", ["fake-model", "alpha", "fake-model:beta"])
def test_create_returns_text_for_each_model(client, model):
    r = api_for(client).responses.create(model=model, input="hello there", max_output_tokens=100)
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    label = model.split(":")[-1] if model != "fake-model" else "base"
    assert r.output_text == f"[{label}] >hello there\n<assistant>"  # the fake's reply to the chat prompt
    assert r.usage.input_tokens == len(client.engine.submitted[-1].prompt_ids) and r.usage.output_tokens > 0


def test_instructions_and_items_become_the_chat_prompt(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "snow"}]
    api_for(client).responses.create(model="fake-model", instructions="Be brief.", input=items, max_output_tokens=5,
                                     tools=[TOOL], tool_choice="none")
    prompt = bytes(client.engine.submitted[-1].prompt_ids).decode()
    assert prompt.startswith('<tool>"get_weather"\n<system>Be brief.\n<user>weather?\n')
    assert '<call>{"name": "get_weather", "arguments": {"city": "Oslo"}}' in prompt and "<answers c1>snow" in prompt


def test_max_output_tokens_makes_it_incomplete(client):
    r = api_for(client).responses.create(model="fake-model", input="hello there", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "[ba"


def test_text_format_is_a_structured_output(make_client):
    c = make_client(script=lambda req, prompt: '{"city": "Paris"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = api_for(c).responses.create(model="alpha", input="where?", max_output_tokens=50,
                                    text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                     "strict": True}})
    assert json.loads(r.output_text) == {"city": "Paris"}
    assert c.engine.structured[-1].kind == "json_schema" and json.loads(c.engine.structured[-1].value) == schema


def test_a_forced_function_call_is_a_function_call_item(make_client):
    c = make_client(script=lambda req, prompt: '{"city": "Paris"}')
    r = api_for(c).responses.create(model="fake-model", input="weather in Paris?", tools=[TOOL], max_output_tokens=50,
                                    tool_choice={"type": "function", "name": "get_weather"})
    [item] = r.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris"}
    assert item.call_id.startswith("call_")


@pytest.mark.parametrize("script,tool_choice", [(lambda req, prompt: "plain words here", None),
                                               (lambda req, prompt: '{"city": "Rome"}',
                                                {"type": "function", "name": "get_weather"})])
def test_stream_events_assemble_into_the_same_response(make_client, script, tool_choice):
    c = make_client(script=script)
    kw = {"tools": [TOOL], "tool_choice": tool_choice} if tool_choice else {}
    whole = api_for(c).responses.create(model="alpha", input="hi", max_output_tokens=60, **kw)
    with api_for(c).responses.stream(model="alpha", input="hi", max_output_tokens=60, **kw) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert ("response.output_text.delta" in kinds) == (tool_choice is None)
    assert ("response.function_call_arguments.delta" in kinds) == (tool_choice is not None)
    assert final.output_text == whole.output_text
    assert [o.type for o in final.output] == [o.type for o in whole.output]
    if tool_choice:
        assert final.output[0].arguments == whole.output[0].arguments


def test_every_field_of_the_openai_client_is_in_the_table():
    sent = set(get_type_hints(response_create_params.ResponseCreateParamsBase)) | {"stream"}
    assert sent - set(fields.RESPONSES) == set()
    honoured = {n for n, r in fields.RESPONSES.items() if r == fields.HONOURED}
    assert honoured - set(ResponsesRequest.model_fields) == set()


@pytest.mark.parametrize("name", [n for n, r in fields.RESPONSES.items() if isinstance(r, fields.Refused)])
def test_refused_fields_are_400s(client, name):
    r = client.post("/v1/responses", json={"model": "fake-model", "input": "x", name: fields.RESPONSES[name].example})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name


@pytest.mark.parametrize("body,param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input.0.content.0"),
    ({"input": [{"type": "web_search_call"}]}, "input.0.type"),
    ({"input": []}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "x", "tools": [TOOL]}, "tool_choice"),   # auto needs a parser, as on chat
])
def test_requests_that_cannot_be_served(client, body, param):
    r = client.post("/v1/responses", json={"model": "fake-model", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_store_false_and_ignored_fields_pass(client):
    r = client.post("/v1/responses", json={"model": "fake-model", "input": "x", "store": False, "user": "u",
                                           "metadata": {"a": "b"}, "reasoning": {"effort": "low"},
                                           "truncation": "disabled", "max_output_tokens": 4})
    assert r.status_code == 200, r.text

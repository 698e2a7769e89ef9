"""Tool calls at the API (FakeEngine with scripted replies): tool_choice modes, the parsers, history
reaching the template, refusals, and streamed tool calls reassembled by the openai client.
A forced call on the real engine: tests/engine/test_structured.py."""

import json

import jsonschema
import openai
import pytest

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "weather in Paris?"}]
HERMES_REPLY = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "fake-model", "messages": ASK, "tools": TOOLS,
                                                     "max_tokens": 400, **body})


def scripted(make_client, reply, parser=""):
    env = {"LORAPLEX_MODEL__TOOL_PARSER": parser} if parser else {}
    return make_client(env=env, script=lambda req, prompt: reply)


def test_a_named_function_is_forced_and_its_arguments_returned_as_a_call(make_client):
    c = scripted(make_client, '{"city": "Paris", "days": 2}')
    r = chat(c, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS)
    s = c.engine.structured[-1]
    assert (s.kind, json.loads(s.value), s.param) == ("json_schema", PARAMS, "tool_choice")
    assert '<tool>"get_weather"' in bytes(c.engine.submitted[-1].prompt_ids).decode()  # tools reach the template


@pytest.mark.parametrize("parallel,max_items", [(None, None), (False, 1)])
def test_required_constrains_to_a_list_of_calls(make_client, parallel, max_items):
    c = scripted(make_client, '[{"name": "get_time", "parameters": {}}]')
    r = chat(c, tool_choice="required", **({} if parallel is None else {"parallel_tool_calls": parallel}))
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert [t["function"]["name"] for t in choice["message"]["tool_calls"]] == ["get_time"]
    schema = json.loads(c.engine.structured[-1].value)
    assert schema["minItems"] == 1 and schema.get("maxItems") == max_items
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "x"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"days": 1}}], schema)


def test_auto_with_the_hermes_parser(make_client):
    c = scripted(make_client, HERMES_REPLY, "hermes")
    choice = chat(c).json()["choices"][0]
    assert choice["message"]["content"] == "Let me check. "
    calls = choice["message"]["tool_calls"]
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert c.engine.structured == []  # auto is not constrained
    one = chat(c, parallel_tool_calls=False).json()["choices"][0]["message"]["tool_calls"]
    assert [t["function"]["name"] for t in one] == ["get_weather"]


def test_auto_with_the_llama3_parser(make_client):
    c = scripted(make_client, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', "llama3_json")
    choice = chat(c, tool_choice="auto").json()["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}


@pytest.mark.parametrize("reply", ["just text", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                                   "<tool_call>{not json</tool_call>"])
def test_auto_replies_without_a_valid_call_are_text(make_client, reply):
    c = scripted(make_client, reply, "hermes")
    choice = chat(c).json()["choices"][0]
    assert choice["message"]["content"] == reply and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"


def test_none_never_calls(make_client):
    c = scripted(make_client, HERMES_REPLY, "hermes")
    choice = chat(c, tool_choice="none").json()["choices"][0]
    assert choice["message"]["content"] == HERMES_REPLY and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("body,param", [
    ({}, "tool_choice"),                                   # auto (the default) needs a parser
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"},
     "tools.0.function.name"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_tool_requests_that_cannot_be_served_are_400s(client, body, param):
    r = chat(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_history_with_calls_and_results_reaches_the_template(make_client):
    c = scripted(make_client, "It is sunny.", "hermes")
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"}]
    r = chat(c, messages=history, max_tokens=100)
    assert r.status_code == 200, r.text
    prompt = bytes(c.engine.submitted[-1].prompt_ids).decode()
    assert '<call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # arguments as an object
    assert "<tool><answers c1>sunny, 21C" in prompt
    assert r.json()["choices"][0]["message"]["content"] == "It is sunny."


@pytest.mark.parametrize("choice,parser,reply", [
    ({"type": "function", "function": {"name": "get_weather"}}, "", '{"city": "Paris"}'),
    ("auto", "hermes", HERMES_REPLY),
    ("required", "",
     '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'),
])
def test_streamed_tool_calls_are_reassembled_by_the_openai_client(make_client, choice, parser, reply):
    c = scripted(make_client, reply, parser)
    api = openai.OpenAI(base_url=str(c.base_url) + "/v1", api_key="x", http_client=c)
    whole = api.chat.completions.create(model="fake-model", messages=ASK, tools=TOOLS, tool_choice=choice,
                                        max_tokens=400).choices[0]
    with api.chat.completions.stream(model="fake-model", messages=ASK, tools=TOOLS, tool_choice=choice,
                                     max_tokens=400) as s:
        final = s.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in final.message.tool_calls] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]
    assert (final.message.content or None) == whole.message.content


def test_hermes_streaming_sends_content_before_the_call_as_it_comes():
    from server.api.tools import ToolPlan, ToolStream

    ts = ToolStream(ToolPlan("auto", TOOLS, parser="hermes"))
    out = []
    for piece in ["Hi ", "there <tool", "_call>", '{"name": "get_time", "arguments": {}}', "</tool_call>"]:
        out += ts.feed(piece)
    assert out == [{"content": "Hi "}, {"content": "there "}]  # "<tool" held back until it is known
    [delta] = ts.finish(complete=True)
    assert delta["tool_calls"][0]["function"]["name"] == "get_time"

"""The field table (server/api/fields.py): every field a client can send is honoured, refused or
ignored on purpose, and the table says which."""

from typing import get_type_hints

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from server.api import fields
from server.api.schemas import ChatCompletionRequest, CompletionRequest

ROUTES = {
    "/v1/completions": (completion_params.CompletionCreateParamsBase, CompletionRequest, fields.COMPLETIONS,
                        {"model": "fake-model", "prompt": "hi", "max_tokens": 4}),
    "/v1/chat/completions": (chat_params.CompletionCreateParamsBase, ChatCompletionRequest, fields.CHAT,
                             {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 4}),
}


@pytest.mark.parametrize("route", ROUTES)
def test_every_field_of_the_openai_client_is_in_the_table(route):
    client_type, _, table, _ = ROUTES[route]
    missing = sorted((set(get_type_hints(client_type)) | {"stream"}) - set(table))
    assert not missing, f"{route}: fields of the openai client not in server/api/fields.py: {missing}"


@pytest.mark.parametrize("route", ROUTES)
def test_honoured_fields_are_declared_in_the_schema(route):
    _, schema, table, _ = ROUTES[route]
    honoured = {name for name, rule in table.items() if rule == fields.HONOURED}
    assert honoured - set(schema.model_fields) == set()


def _refused(route):
    return [(route, name) for name, rule in ROUTES[route][2].items() if isinstance(rule, fields.Refused)]


@pytest.mark.parametrize("route,name", _refused("/v1/completions") + _refused("/v1/chat/completions"))
def test_a_refused_field_is_a_400_naming_it(client, route, name):
    base, rule = ROUTES[route][3], ROUTES[route][2][name]
    r = client.post(route, json={**base, name: rule.example})
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_neutral_values_and_ignored_fields_pass(client, route):
    base, table = ROUTES[route][3], ROUTES[route][2]
    neutral = {"skip_special_tokens": True, "length_penalty": 1.0, "bad_words": [], "response_format": {"type": "text"},
               "include_stop_str_in_output": False, "echo": False}
    if route == "/v1/chat/completions":
        neutral.update({"tool_choice": "none", "modalities": ["text"], "add_generation_prompt": True})
    ignored = {name: "x" for name, rule in table.items() if rule == "ignored"}
    ignored.update({"metadata": {"k": "v"}, "store": True} if route == "/v1/chat/completions" else {})
    r = client.post(route, json={**base, **neutral, **ignored, "some_unknown_field": 1})
    assert r.status_code == 200, r.text
    assert all(name in table for name in neutral)


@pytest.mark.parametrize("message,param", [
    ({"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}},
     "messages.1.function_call"),
    ({"role": "assistant", "content": "", "audio": {"id": "a1"}}, "messages.1.audio"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
     "messages.1.content"),
])
def test_message_parts_that_would_be_dropped_are_refused(client, message, param):
    r = client.post("/v1/chat/completions", json={"model": "fake-model", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}, message]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


@pytest.mark.parametrize("body,param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"stop_token_ids": [100000]}, "stop_token_ids"),
    ({"min_p": 1.5}, "min_p"),
])
def test_token_id_fields_are_checked(client, body, param):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_sampling_fields_reach_the_engine(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 4, "min_p": 0.1,
                                             "logit_bias": {"7": -100, "5": 2.5}, "stop_token_ids": [9]})
    assert r.status_code == 200, r.text
    p = client.engine.submitted[-1].params
    assert (p.min_p, p.logit_bias, p.stop_token_ids) == (0.1, ((5, 2.5), (7, -100.0)), (9,))


def test_every_ignored_field_says_why_and_the_readme_lists_every_field():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("<!-- fields table -->"):readme.index("<!-- end fields table -->")]
    for route, t in fields.TABLES.items():
        for name, rule in t.items():
            if rule == "ignored":
                assert name in fields.IGNORED_WHY, name
            row = next(line for line in table.splitlines() if line.startswith(f"| `{route}`"))
            kind = "honoured" if rule == fields.HONOURED else "ignored" if rule == "ignored" else "refused"
            cells = dict(zip(["route", "honoured", "refused", "ignored"],
                             [c.strip() for c in row.strip("|").split("|")]))
            assert f"`{name}`" in cells[kind], (route, name, kind)


def test_bad_words_reach_the_engine_as_token_sequences(client):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 4,
                                             "bad_words": ["ab"]})
    assert r.status_code == 200, r.text
    assert client.engine.submitted[-1].params.bad_words == ((32, 97, 98), (97, 98))  # " ab" and "ab" in bytes

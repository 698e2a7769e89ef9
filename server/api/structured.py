"""Which structured-output constraint a request asks for, from OpenAI's and vLLM's fields.

Owns: reading `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs`
(`json`, `regex`, `choice`, `grammar`, `json_object`, `disable_any_whitespace`) and its older
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` into one `Structured`; refusing
two constraints at once, sizes past the cap, and settings that would fight a grammar (ignore_eos,
min_tokens: a grammar that is complete allows nothing but end-of-sequence). Whether the constraint
compiles is the engine's answer (`compile_structured`), also a 400. It knows nothing of tokens.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.grammar import Structured
from ..errors import InvalidRequest
from .schemas import SamplingFields

MAX_SPEC_CHARS = 64 * 1024


def _json_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidRequest(f"{param}: not valid JSON ({e})", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise InvalidRequest(f"{param}: a JSON schema is an object", param=param)
    return json.dumps(value)


def _found(body: SamplingFields) -> list[tuple[str, str, str]]:
    """(kind, value, param) for each constraint the request names."""
    out: list[tuple[str, str, str]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidRequest("response_format.json_schema.schema is required for type json_schema",
                                 param="response_format.json_schema")
        out.append(("json_schema", _json_text(rf.json_schema.schema_, "response_format.json_schema.schema"),
                    "response_format.json_schema.schema"))
    for field, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        value = getattr(body, field)
        if value is not None:
            out.append((kind, _encode(kind, value, field), field))
    so = body.structured_outputs
    if so is not None:
        unknown = sorted(k for k, v in (so.model_extra or {}).items() if v is not None)
        if unknown:
            raise InvalidRequest(f"structured_outputs.{unknown[0]} is not supported",
                                 param=f"structured_outputs.{unknown[0]}")
        for field, kind, value in (("json", "json_schema", so.json_), ("regex", "regex", so.regex),
                                   ("choice", "choice", so.choice), ("grammar", "grammar", so.grammar)):
            if value is not None:
                out.append((kind, _encode(kind, value, f"structured_outputs.{field}"), f"structured_outputs.{field}"))
        if so.json_object:
            out.append(("json_object", "", "structured_outputs.json_object"))
    return out


def _encode(kind: str, value: Any, param: str) -> str:
    if kind == "json_schema":
        return _json_text(value, param)
    if kind == "choice":
        if any(not c for c in value):
            raise InvalidRequest(f"{param}: choices must not be empty strings", param=param)
        return json.dumps(list(value))
    if not value or not isinstance(value, str):
        raise InvalidRequest(f"{param} must be a non-empty string", param=param)
    return value


def structured_of(body: SamplingFields) -> Structured | None:
    """The request's one constraint, or None; InvalidRequest for a request that cannot have it."""
    found = _found(body)
    if not found:
        return None
    if len(found) > 1:
        raise InvalidRequest(f"one structured-output constraint per request, got {len(found)}: "
                             f"{', '.join(p for _, _, p in found)}", param=found[1][2])
    kind, value, param = found[0]
    if len(value) > MAX_SPEC_CHARS:
        raise InvalidRequest(f"{param} is {len(value)} characters; the limit is {MAX_SPEC_CHARS}", param=param)
    for field, on in (("ignore_eos", body.ignore_eos), ("min_tokens", body.min_tokens)):
        if on:
            raise InvalidRequest(f"{field} cannot be combined with a structured-output constraint ({param}): "
                                 "a complete output must be able to end", param=field)
    so = body.structured_outputs
    any_ws = so is not None and so.disable_any_whitespace is False
    return Structured(kind, value, any_whitespace=any_ws, param=param)

"""Tool calls on /v1/chat/completions: what `tools` and `tool_choice` ask, and the reply parsed back.

Owns: `ToolPlan` (the request's tools and how the model must use them), the constraint that forces
a call (`tool_choice: "required"` or a named function: xgrammar enforces a JSON schema of the
arguments, so they validate), the parsers per model family for `"auto"` (`hermes`: Hermes / Qwen
`<tool_call>{...}</tool_call>`; `llama3_json`: Llama 3's bare `{"name", "parameters"}` objects) chosen
by `model.tool_parser`, and `ToolStream`, which turns a choice's text deltas into OpenAI's
incremental `delta.tool_calls`. As vLLM: `"auto"` without a parser is a 400, `"none"` never calls,
`parallel_tool_calls: false` means at most one call. The tools reach the model through its own chat
template (`engine/tokens.py` refuses a template that would drop them). It knows nothing of tokens.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.grammar import Structured
from ..errors import InvalidRequest

PARSERS = ("hermes", "llama3_json")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
HERMES_OPEN = "<tool_call>"


@dataclass
class ToolPlan:
    mode: str                       # none | auto | required | named
    tools: list[dict[str, Any]]     # OpenAI tool objects, as the chat template takes them
    name: str | None = None         # the forced function (mode named)
    parser: str = ""                # hermes | llama3_json (mode auto)
    parallel: bool = True

    @property
    def schemas(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}

    def structured(self) -> Structured | None:
        """The constraint that forces the call, or None (auto, none)."""
        if self.mode == "named":
            assert self.name is not None, "a named tool_choice names its function"
            return Structured("json_schema", json.dumps(self.schemas[self.name]), param="tool_choice")
        if self.mode == "required":
            # vLLM's shape: a list of {"name", "parameters"}, one schema per function.
            item = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "parameters": s},
                               "required": ["name", "parameters"], "additionalProperties": False}
                              for n, s in self.schemas.items()]}
            schema = {"type": "array", "items": item, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}
            return Structured("json_schema", json.dumps(schema), param="tool_choice")
        return None


def plan_tools(tools: list[Any] | None, choice: Any, parallel: bool | None, parser: str) -> ToolPlan | None:
    """The request's ToolPlan; InvalidRequest for a choice that cannot be served."""
    dicts = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t for t in tools or []]
    if hasattr(choice, "model_dump"):
        choice = choice.model_dump(exclude_none=True)
    if not dicts:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    names = [t["function"]["name"] for t in dicts]
    for i, n in enumerate(names):
        if not NAME.match(n):
            raise InvalidRequest(f"tools.{i}.function.name {n!r}: letters, digits, _ . - and at most 64",
                                 param=f"tools.{i}.function.name")
    if len(set(names)) != len(names):
        raise InvalidRequest("tool function names must be unique", param="tools")
    plan = ToolPlan("auto", dicts, parser=parser, parallel=parallel is not False)
    if choice in (None, "auto"):
        if not parser:
            raise InvalidRequest('tool_choice "auto" needs a tool-call parser for this model: set model.tool_parser '
                                 f'({" | ".join(PARSERS)}), or use "required" or a named function', param="tool_choice")
    elif choice in ("none", "required"):
        plan.mode = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        plan.mode, plan.name = "named", name
    else:
        raise InvalidRequest('tool_choice is "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}', param="tool_choice")
    return plan


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _objects(text: str) -> list[dict[str, Any]] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    value = value if isinstance(value, list) else [value]
    return value if all(isinstance(v, dict) for v in value) else None


def parse(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a finished reply. Text that parses as no call stays content."""
    if plan.mode == "none":
        return text, []
    if plan.mode == "named":
        return None, [_call(plan.name or "", text)]
    found: list[tuple[Any, Any]] = []   # (name as the model wrote it, arguments)
    content: str | None = text
    if plan.mode == "required":
        for o in _objects(text) or []:
            found.append((o.get("name"), o.get("parameters", {})))
        content = None if found else text
    elif plan.parser == "hermes":
        for m in HERMES.finditer(text):
            objs = _objects(m.group(1))
            if objs:
                found += [(x.get("name"), x.get("arguments", {})) for x in objs]
        if found:
            content = text[:text.find(HERMES_OPEN)]  # as streamed: the text before the first call
            content = content if content.strip() else None
    elif plan.parser == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>")
        for part in body.split(";") if body.startswith("{") else []:
            objs = _objects(part.strip())
            if not objs:
                found = []
                break
            found += [(x.get("name"), x.get("parameters", x.get("arguments", {}))) for x in objs]
        content = None if found else text
    known = plan.schemas
    calls = [_call(n, a) for n, a in found if n in known]
    if len(calls) != len(found):  # a call to a function nobody offered: the reply is text
        return text, []
    return content, calls[:1] if not plan.parallel else calls


@dataclass
class ToolStream:
    """One choice's text deltas in, OpenAI chat deltas out: content as it comes while no call can
    have started; a named call's arguments as they come; other calls when the reply ends."""

    plan: ToolPlan
    held: str = ""
    buffering: bool = False
    started: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if self.plan.mode == "none":
            return [{"content": text}]
        if self.plan.mode == "named":
            if not self.started:
                self.started = True
                call = _call(self.plan.name or "", "")
                self.calls.append(call)
                return [{"tool_calls": [{"index": 0, **call, "function": {"name": self.plan.name,
                                                                          "arguments": text}}]}]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        self.held += text
        if self.plan.mode == "required" or self.buffering:
            self.buffering = True
            return []
        if self.plan.parser == "llama3_json" and self.held.lstrip()[:1] in ("{", "<"):
            self.buffering = True
            return []
        at = self.held.find(HERMES_OPEN)
        if at >= 0:
            out, self.held, self.buffering = self.held[:at], self.held[at:], True
            return [{"content": out}] if out else []
        keep = next((k for k in range(min(len(HERMES_OPEN) - 1, len(self.held)), 0, -1)
                     if HERMES_OPEN.startswith(self.held[-k:])), 0)  # a tag may be starting: hold it
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return [{"content": out}] if out else []

    def finish(self, complete: bool) -> list[dict[str, Any]]:
        """The deltas left when the reply ends: the parsed calls, or the held text as content
        (always, for a reply cut short: never a half call)."""
        if self.plan.mode in ("none", "named") or not self.held:
            return []
        held, self.held = self.held, ""
        if not complete:
            return [{"content": held}]
        content, calls = parse(self.plan, held)
        self.calls = calls
        out: list[dict[str, Any]] = [{"content": content}] if content else []
        out += [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(calls)]
        return out

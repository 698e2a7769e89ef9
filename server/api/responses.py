"""POST /v1/responses: OpenAI's Responses API for text, served by the chat pipeline.

Owns: reading a Responses request (`input` as a string or message / function_call /
function_call_output items, `instructions`, `max_output_tokens`, `text.format`, flat function
`tools`, `tool_choice`) into the equivalent chat request, and writing the result back as a
Response object, or as the Responses stream events the SDKs consume (`response.created`,
`response.output_item.added`, `response.output_text.delta`, `response.function_call_arguments.delta`,
... `response.completed`). Everything in between — fields, structured outputs, tool calls, adapters,
limits — is the chat route's (`openai.py`), so the two can never disagree. Nothing is stored on the
server: `previous_response_id`, `conversation`, `background` and `store: true` are 400s.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from ..engine.types import GenerationEvent
from ..errors import InvalidRequest
from . import fields
from .convert import Plan, chat_message, plan_chat
from .deps import AppState, require_inference
from .errors import describe
from .openai import run_request
from .schemas import ChatCompletionRequest, _Wire
from .streaming import merge
from .tools import ToolStream, plan_tools

router = APIRouter()


class ResponsesRequest(_Wire):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    user: str | None = None  # seeds a weighted alias's choice


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise InvalidRequest(f"{where}.content.{i}: {kind} parts are not supported (text only)",
                                     param=f"{where}.content.{i}")
            parts.append(str(p.get("text", "")))
        return "".join(parts)
    raise InvalidRequest(f"{where}.content must be text or a list of text parts", param=f"{where}.content")


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat messages a Responses input stands for (function calls and their outputs included)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        kind, where = item.get("type", "message"), f"input.{i}"
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"{where}.role must be user, system, developer or assistant",
                                     param=f"{where}.role")
            out.append({"role": item["role"], "content": _text(item.get("content", ""), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                        "content": _text(item.get("output", ""), where)})
        else:
            raise InvalidRequest(f"{where}: {kind} items are not supported", param=f"{where}.type")
    if not out:
        raise InvalidRequest("input is empty", param="input")
    return out


def _format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object", param="text.format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    return {"type": fmt.get("type")}


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request with the same meaning; its validation errors name the chat fields."""
    tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                               if k in t}} if t.get("type") == "function" else t
             for t in body.tools or []]
    for i, t in enumerate(body.tools or []):
        if t.get("type") != "function":
            raise InvalidRequest(f"tools.{i}: {t.get('type')} tools are not supported (function tools only)",
                                 param=f"tools.{i}.type")
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    chat = {"model": body.model, "messages": _messages(body), "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "response_format": _format(body.text),
            "tools": tools or None, "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls,
            "stream": body.stream, "user": body.user}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ())]
        head = _RENAMED.get(loc[0], loc[0]) if loc else None
        raise InvalidRequest(f"{head}: {first.get('msg', 'invalid value')}", param=head) from None


# The chat field each Responses field became, back again for error messages.
_RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


def _echo_fields(body: ResponsesRequest) -> dict[str, Any]:
    return {"instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "top_p": body.top_p if body.top_p is not None else 1.0, "tools": body.tools or [],
            "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "text": body.text or {"format": {"type": "text"}}, "error": None, "metadata": {},
            "previous_response_id": None, "reasoning": None, "store": False, "truncation": "disabled",
            "user": body.user, "background": False}


def _response(rid: str, body: ResponsesRequest, status: str, output: list[dict[str, Any]],
              usage: dict[str, int] | None, finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "model": body.model, "status": status,
            "output": output, "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "usage": usage, **_echo_fields(body)}


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


def _message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request,
                          state: AppState = Depends(require_inference)) -> Any:
    fields.check(body, "/v1/responses")
    chat = to_chat(body)
    tools = plan_tools(chat.tools, chat.tool_choice, chat.parallel_tool_calls, state.config.model.tool_parser)
    rid = f"resp_{uuid.uuid4().hex}"
    plan, result = await run_request(request, state, chat, functools.partial(plan_chat, tools=tools),
                                     functools.partial(_events, rid, body), "/v1/responses",
                                     tools.structured() if tools is not None else None)
    if not isinstance(result, list):
        return result if result is not None else JSONResponse({}, status_code=499)
    [a] = result
    done = chat_message(plan, a.text, a.finish_reason)
    msg = done["message"]
    output = ([_message_item(msg["content"])] if msg["content"] else []) + [
        _call_item(c) for c in msg.get("tool_calls", [])]
    status = "incomplete" if a.finish_reason == "length" else "completed"
    return _response(rid, body, status, output, _usage(plan.prompt_tokens, a.completion_tokens), a.finish_reason)


async def _events(rid: str, body: ResponsesRequest, plan: Plan, model: str,
                  streams: list[AsyncIterator[GenerationEvent]], include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """The Responses stream of the one choice: each event as {"event", "data"} for sse-starlette."""
    seq = 0

    def ev(kind: str, **data: Any) -> dict[str, str]:
        nonlocal seq
        seq += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": seq - 1, **data},
                                                  ensure_ascii=False)}

    yield ev("response.created", response=_response(rid, body, "in_progress", [], None))
    yield ev("response.in_progress", response=_response(rid, body, "in_progress", [], None))
    ts = ToolStream(plan.tools) if plan.tools is not None else None
    output: list[dict[str, Any]] = []
    text_item: dict[str, Any] | None = None
    calls: dict[int, dict[str, Any]] = {}     # tool call index -> its output item
    completion, finish = 0, None

    def open_text() -> list[dict[str, str]]:
        nonlocal text_item
        text_item = _message_item("", "in_progress")
        output.append(text_item)
        idx = len(output) - 1
        return [ev("response.output_item.added", output_index=idx, item={**text_item, "content": []}),
                ev("response.content_part.added", item_id=text_item["id"], output_index=idx, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    try:
        async for _, e in merge(streams):
            completion, finish = e.completion_tokens, e.finish_reason or finish
            deltas: list[dict[str, Any]] = (ts.feed(e.text) if ts is not None else
                                            [{"content": e.text}] if e.text else [])
            if e.finish_reason and ts is not None:
                deltas += ts.finish(complete=e.finish_reason == "stop")
            for d in deltas:
                if d.get("content"):
                    if text_item is None:
                        for x in open_text():
                            yield x
                    assert text_item is not None, "set by open_text"
                    text_item["content"][0]["text"] += d["content"]
                    yield ev("response.output_text.delta", item_id=text_item["id"],
                             output_index=output.index(text_item), content_index=0, delta=d["content"], logprobs=[])
                for tc in d.get("tool_calls", []):
                    item = calls.get(tc["index"])
                    if item is None:
                        item = calls[tc["index"]] = _call_item({"id": tc["id"], "function": {
                            "name": tc["function"]["name"], "arguments": ""}}, "in_progress")
                        output.append(item)
                        yield ev("response.output_item.added", output_index=len(output) - 1, item=dict(item))
                    piece = tc["function"].get("arguments", "")
                    item["arguments"] += piece
                    if piece:
                        yield ev("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=output.index(item), delta=piece)
    except Exception as err:
        yield ev("error", **describe(err)[1]["error"])
        return
    for idx, item in enumerate(output):
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            yield ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                     text=part["text"], logprobs=[])
            yield ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0, part=part)
        else:
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                     arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=idx, item=item)
    status = "incomplete" if finish == "length" else "completed"
    final = _response(rid, body, status, output, _usage(plan.prompt_tokens, completion), finish)
    yield ev("response.completed" if status == "completed" else "response.incomplete", response=final)

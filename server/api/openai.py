"""The OpenAI-compatible inference routes under /v1, and /health and /ready.

Owns: request handling order — auth and readiness, model resolution (404),
conversion (400), submission (429/503), then either an SSE stream or a JSON
body — and stopping generation when the client goes away: streams through
sse-starlette's disconnect detection, non-streaming requests by watching the
connection while they wait.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from ..engine.grammar import Structured
from ..engine.types import GenerationEvent
from ..errors import InvalidRequest
from ..registry import Lease
from . import fields
from .convert import (
    ChoiceAccumulator,
    Plan,
    chat_logprobs,
    chat_message,
    completion_choice,
    plan_chat,
    plan_completion,
    usage,
    vllm_prompt_logprobs,
)
from .deps import AppState, allowed_of, require_inference
from .observe import RequestRecord, adapter_label
from .schemas import ChatCompletionRequest, CompletionRequest
from .streaming import chat_chunks, completion_chunks, merge
from .structured import structured_of
from .tools import plan_tools

log = logging.getLogger("loraplex.api")
router = APIRouter()


def _submit(state: AppState, plan: Plan) -> list[AsyncGenerator[GenerationEvent, None]]:
    """Submit every choice, or none: a refusal part-way aborts those already queued."""
    streams = []
    try:
        for r in plan.requests:
            streams.append(state.engine.submit(r))
    except BaseException:
        _abort_all(state, plan)
        raise
    return streams


def _abort_all(state: AppState, plan: Plan) -> None:
    for r in plan.requests:
        state.engine.abort(r.request_id)


async def _collect(request: Request, state: AppState, plan: Plan,
                   streams: list[AsyncGenerator[GenerationEvent, None]]) -> list[ChoiceAccumulator] | None:
    """Run all choices to the end; None if the client disconnected first (generation aborted)."""
    acc = [ChoiceAccumulator() for _ in streams]

    async def run() -> None:
        async for i, ev in merge(streams):
            acc[i].add(ev)

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work, watch = asyncio.create_task(run()), asyncio.create_task(gone())
    abandoned = True
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this handler is cancelled: the generation must not outlive it.
        watch.cancel()
        abandoned = not work.done()
        if abandoned:
            work.cancel()
            _abort_all(state, plan)
            await asyncio.gather(work, return_exceptions=True)
    if abandoned:
        log.info("%s: client disconnected; generation aborted", plan.id)
        return None
    work.result()  # re-raise an engine error
    return acc


def _stream(state: AppState, plan: Plan, chunks: Callable[..., Any], model: str, include_usage: bool,
            streams: list[AsyncGenerator[GenerationEvent, None]], lease: Lease,
            record: RequestRecord) -> EventSourceResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for data in chunks(plan, model, streams, include_usage):
                yield data
        finally:
            _abort_all(state, plan)  # no-op for finished requests; stops the rest
            state.registry.release(lease)
            record.done()
    # send_timeout: a client that stops reading blocks the send once its socket is full; past the
    # limit sse-starlette closes the stream, and the `finally` above aborts and releases.
    return EventSourceResponse(events(), ping=15, send_timeout=state.config.server.stream_idle_timeout_s or None)


async def run_request(request: Request, state: AppState, body: Any, planner: Callable[..., Any],
                      chunks: Callable[..., Any], route: str, forced: Structured | None = None) -> Any:
    """The shared flow of both routes; returns the stream response or the accumulated choices.
    `forced`: the constraint a forced tool call puts on the reply."""
    spec = structured_of(body)
    if spec is not None and forced is not None:
        raise InvalidRequest(f"{spec.param} cannot be combined with a forced tool call (tool_choice)",
                             param=spec.param)
    spec = spec or forced
    mix = [(a.name, a.weight) for a in body.adapters] if body.adapters else None
    # An unknown model (or one outside the key's scope) ends here: no metrics series.
    # A weighted alias (a canary) picks its target by the user, else the request id: reproducible.
    seed = body.user if isinstance(getattr(body, "user", None), str) else request.state.request_id
    lease = await state.registry.acquire(body.model, mix, allowed_of(request), seed)
    record = RequestRecord(state.metrics, request_id=request.state.request_id, route=route, model=body.model,
                           adapter=adapter_label(lease, state.engine.model_id), version=lease.version)
    streaming = False
    try:
        plan = planner(body, state.engine.tokenizer, state.engine.context_length, state.config.server,
                       lease.adapter)
        record.prompt_tokens = plan.prompt_tokens
        grammar = await state.engine.compile_structured(spec) if spec is not None else None
        for r in plan.requests:  # a per-request mix: its sources and weights, leased above
            r.mix = lease.mix
            r.grammar = grammar
        if state.config.server.request_timeout_s:  # the engine ends it past this (408 / an error event)
            deadline = time.monotonic() + state.config.server.request_timeout_s
            for r in plan.requests:
                r.deadline = deadline
        streams = [record.wrap(s) for s in _submit(state, plan)]
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            streaming = True  # from here the stream's own `finally` releases the lease and reports
            return plan, _stream(state, plan, chunks, body.model, include, streams, lease, record)
        result = await _collect(request, state, plan, streams)
        record.done()
        return plan, result
    except Exception as e:
        record.done(error=e)
        raise
    finally:
        if not streaming:
            state.registry.release(lease)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: AppState = Depends(require_inference)) -> Any:
    fields.check(body, "/v1/completions")
    plan, result = await run_request(request, state, body, plan_completion, completion_chunks, "/v1/completions")
    if not isinstance(result, list):
        return result if result is not None else JSONResponse({}, status_code=499)
    choices = [completion_choice(plan, i, a.text, a.finish_reason, a.logprobs, a.prompt_logprobs,
                                 body.logprobs is not None) for i, a in enumerate(result)]
    return {"id": plan.id, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "choices": choices, "usage": usage(plan.prompt_tokens, sum(a.completion_tokens for a in result))}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: AppState = Depends(require_inference)) -> Any:
    fields.check(body, "/v1/chat/completions")
    tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, state.config.model.tool_parser)
    plan, result = await run_request(request, state, body, functools.partial(plan_chat, tools=tools), chat_chunks,
                              "/v1/chat/completions", tools.structured() if tools is not None else None)
    if not isinstance(result, list):
        return result if result is not None else JSONResponse({}, status_code=499)
    choices = [{"index": i, **chat_message(plan, a.text, a.finish_reason),
                "logprobs": chat_logprobs(a.logprobs) if a.logprobs is not None else None}
               for i, a in enumerate(result)]
    out = {"id": plan.id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
           "choices": choices, "usage": usage(plan.prompt_tokens, sum(a.completion_tokens for a in result))}
    if plan.vllm_prompt_logprobs:  # vLLM's extension, on the response (one prompt for every choice)
        out["prompt_logprobs"] = vllm_prompt_logprobs(result[0].prompt_logprobs or [])
    return out

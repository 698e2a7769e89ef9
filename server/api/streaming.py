"""Running a request's choices together and framing them as OpenAI chunks.

Owns: `merge` (several engine event streams into one, in arrival order, with
every stream closed, and so aborted, when the consumer stops) and the chunk
generators for `/v1/completions` and `/v1/chat/completions`. SSE framing
(`data: ...` lines, keep-alive pings, disconnect detection) is sse-starlette's;
this module yields the JSON payloads, the error event and the `[DONE]` marker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..engine.types import GenerationEvent
from .convert import Plan, chat_logprobs, completion_choice, usage, vllm_prompt_logprobs
from .errors import describe
from .tools import ToolStream

_END = object()


async def merge(streams: Sequence[AsyncIterator[GenerationEvent]]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Yield (choice index, event) from all streams as events arrive.

    Each stream is pumped by its own task. Leaving this generator (client gone,
    error) cancels the tasks, which closes each stream and so aborts its request.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[GenerationEvent]) -> None:
        try:
            async for ev in stream:
                queue.put_nowait((i, ev))
        except Exception as e:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def completion_chunks(plan: Plan, model: str, streams: list[AsyncIterator[GenerationEvent]],
                            include_usage: bool) -> AsyncIterator[str]:
    rid, prompt_tokens = plan.id, plan.prompt_tokens
    created = int(time.time())
    completion_tokens = [0] * len(streams)
    offsets = [0] * len(streams)
    first = [True] * len(streams)
    try:
        async for i, ev in merge(streams):
            completion_tokens[i] = ev.completion_tokens
            choice = completion_choice(plan, i, ev.text, ev.finish_reason, ev.logprobs, ev.prompt_logprobs,
                                       plan.requests[i].params.logprobs is not None, first=first[i],
                                       offset=offsets[i])
            first[i] = False
            lp = choice["logprobs"]
            if lp is not None and lp["tokens"]:
                offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            if not choice["text"] and not ev.finish_reason and lp is None:
                continue
            yield _dump({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": [choice]})
    except Exception as e:
        yield _dump(describe(e)[1])
        yield "[DONE]"
        return
    if include_usage:
        yield _dump({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                     "usage": usage(prompt_tokens, sum(completion_tokens))})
    yield "[DONE]"


def _deltas(tools: ToolStream | None, ev: GenerationEvent) -> list[dict[str, Any]]:
    """One event's chat deltas: its text, or what the tool-call stream makes of it."""
    if tools is None:
        return [{"content": ev.text}] if ev.text else []
    out = tools.feed(ev.text)
    if ev.finish_reason:
        out += tools.finish(complete=ev.finish_reason == "stop")
    return out


async def chat_chunks(plan: Plan, model: str, streams: list[AsyncIterator[GenerationEvent]],
                      include_usage: bool) -> AsyncIterator[str]:
    rid, prompt_tokens = plan.id, plan.prompt_tokens
    created = int(time.time())
    completion_tokens = [0] * len(streams)

    def chunk(choices: list[dict[str, Any]]) -> str:
        return _dump({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": choices})

    tools = [ToolStream(plan.tools) if plan.tools is not None else None for _ in streams]
    # The first chunk of each choice carries the role, as OpenAI's do.
    for i in range(len(streams)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    try:
        async for i, ev in merge(streams):
            completion_tokens[i] = ev.completion_tokens
            lp = chat_logprobs(ev.logprobs) if ev.logprobs else None
            deltas = _deltas(tools[i], ev)
            finish = ev.finish_reason
            tool = tools[i]
            if finish == "stop" and tool is not None and tool.calls:
                finish = "tool_calls"
            extra = {}
            if ev.prompt_logprobs is not None and plan.vllm_prompt_logprobs:
                extra["prompt_logprobs"] = vllm_prompt_logprobs(ev.prompt_logprobs)
            elif not deltas and not finish and lp is None:
                continue
            deltas = deltas or [{}]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                yield chunk([{"index": i, "delta": delta, "logprobs": lp if k == 0 else None,
                              "finish_reason": finish if last else None, **(extra if k == 0 else {})}])
    except Exception as e:
        yield _dump(describe(e)[1])
        yield "[DONE]"
        return
    if include_usage:
        yield _dump({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens))})
    yield "[DONE]"

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
from typing import Any, AsyncIterator

from ..engine.types import GenerationEvent
from .convert import chat_logprobs, completion_logprobs, usage
from .errors import describe

_END = object()


async def merge(streams: list[AsyncIterator[GenerationEvent]]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Yield (choice index, event) from all streams as events arrive.

    Each stream is pumped by its own task. Leaving this generator (client gone,
    error) cancels the tasks, which closes each stream and so aborts its request.
    """
    queue: asyncio.Queue = asyncio.Queue()

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


async def completion_chunks(rid: str, model: str, streams: list[AsyncIterator[GenerationEvent]],
                            prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    completion_tokens = [0] * len(streams)
    offsets = [0] * len(streams)
    try:
        async for i, ev in merge(streams):
            completion_tokens[i] = ev.completion_tokens
            lp = None
            if ev.logprobs:
                lp = completion_logprobs(ev.logprobs, offsets[i])
                offsets[i] += sum(len(e.token) for e in ev.logprobs)
            if not ev.text and not ev.finish_reason and lp is None:
                continue
            yield _dump({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": i, "text": ev.text, "logprobs": lp,
                                      "finish_reason": ev.finish_reason}]})
    except Exception as e:
        yield _dump(describe(e)[1])
        yield "[DONE]"
        return
    if include_usage:
        yield _dump({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                     "usage": usage(prompt_tokens, sum(completion_tokens))})
    yield "[DONE]"


async def chat_chunks(rid: str, model: str, streams: list[AsyncIterator[GenerationEvent]],
                      prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    completion_tokens = [0] * len(streams)

    def chunk(choices: list[dict[str, Any]]) -> str:
        return _dump({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": choices})

    # The first chunk of each choice carries the role, as OpenAI's do.
    for i in range(len(streams)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    try:
        async for i, ev in merge(streams):
            completion_tokens[i] = ev.completion_tokens
            lp = chat_logprobs(ev.logprobs) if ev.logprobs else None
            if not ev.text and not ev.finish_reason and lp is None:
                continue
            delta = {"content": ev.text} if ev.text else {}
            yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
    except Exception as e:
        yield _dump(describe(e)[1])
        yield "[DONE]"
        return
    if include_usage:
        yield _dump({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens))})
    yield "[DONE]"

"""The hand-off: the engine's per-step batch of tokens becomes client events on another thread.

Owns: one output thread and its queue. The engine thread, after each step, puts one batch of
`TokenOut` (request, token id, raw logprobs, whether the engine ended it) and `ErrorOut`
entries; this thread detokenizes (`Sequence.append`: text deltas, stop strings), names the
logprob tokens, and hands every event of the batch to its request's asyncio loop with one
`call_soon_threadsafe` per loop. So the engine thread does only scheduling and tensors, and the
tokenizer work of step N overlaps the forward of step N + 1 (torch releases the GIL).

Who ends a request, as in vLLM v1: end-of-sequence / stop token ids and max_tokens are token
rules, decided on the engine thread (`sequence.token_finish`), which frees the blocks at once; a
stop string is text, found here, and this thread then asks the engine to abort the request
(`on_stop`). Tokens the engine computed for it in the meantime are dropped here, never sent.

Events for one request leave in the order the engine put them (one thread, one FIFO queue),
errors included. It knows nothing of tensors, blocks or adapters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from .sequence import Sequence
from .types import GenerationEvent, TokenLogprob

log = logging.getLogger("loraplex.output")


@dataclass
class Sink:
    """Where one request's events go."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]


@dataclass
class TokenOut:
    sink: Sink
    seq: Sequence                   # touched only by the output thread once handed over
    token: int                      # -1: no token; the request scored its prompt only (max_tokens 0)
    logprob: TokenLogprob | None    # token texts still empty: named here
    finished: bool                  # the engine ended the request with this token (a token rule)
    queue_time: float | None = None  # set on the request's first token
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token, when asked (named here)


@dataclass
class ErrorOut:
    sink: Sink
    request_id: str
    error: Exception


def name_tokens(lp: TokenLogprob | None, token_text: Callable[[int], str]) -> TokenLogprob | None:
    return None if lp is None else named(lp, token_text)


def named(lp: TokenLogprob, token_text: Callable[[int], str]) -> TokenLogprob:
    """The entry with its token texts filled in (the engine thread leaves them empty)."""
    return dataclasses.replace(lp, token=token_text(lp.token_id),
                               top=tuple((t, token_text(t), v) for t, _, v in lp.top))


def _deliver(items: list[tuple[asyncio.Queue[Any], GenerationEvent]]) -> None:
    for q, ev in items:
        q.put_nowait(ev)


class OutputProcessor:
    def __init__(self, token_text: Callable[[int], str], on_stop: Callable[[str], None]):
        self.token_text = token_text
        self.on_stop = on_stop              # engine.abort: a stop string ended the request
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue[Any]()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="loraplex-output", daemon=True)
        self._thread.start()

    def put(self, batch: list[TokenOut | ErrorOut]) -> None:
        if batch:
            self._queue.put(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self.process(batch)
            except Exception:  # a bug here must not silence every later request
                log.exception("output processing failed for a batch of %d", len(batch))

    def process(self, batch: list[TokenOut | ErrorOut]) -> None:
        """Turn one step's batch into events and deliver them (the output thread; tests call it directly)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], GenerationEvent]]] = {}
        for item in batch:
            if isinstance(item, ErrorOut):
                ev = GenerationEvent(item.request_id, error=item.error)
            else:
                seq = item.seq
                if seq.finished:
                    continue  # computed after a stop string ended it; the abort is on its way
                if item.token < 0:
                    seq.finish_reason = "length"
                    ev = GenerationEvent(seq.request_id, finish_reason="length",
                                         prompt_tokens=len(seq.request.prompt_ids))
                else:
                    ev = seq.append(item.token, name_tokens(item.logprob, self.token_text))
                ev.queue_time = item.queue_time
                if item.prompt_logprobs is not None:
                    ev.prompt_logprobs = [named(lp, self.token_text) for lp in item.prompt_logprobs]
                if seq.finished and not item.finished:
                    self.on_stop(seq.request_id)
            by_loop.setdefault(item.sink.loop, []).append((item.sink.queue, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass


async def events(request_id: str, queue: asyncio.Queue[Any],
                 abort: Callable[[str], None]) -> AsyncGenerator[GenerationEvent, None]:
    """One request's events from its queue, to its last; an error event is raised. A consumer that
    leaves early (the client is gone) aborts the request."""
    done = False
    try:
        while True:
            ev: GenerationEvent = await queue.get()
            if ev.error is not None:
                done = True
                raise ev.error
            yield ev
            if ev.finish_reason is not None:
                done = True
                return
    finally:
        if not done:
            abort(request_id)

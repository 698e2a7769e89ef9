"""Watching one request: its metrics and its one structured log line.

Owns: `RequestRecord`, which wraps a request's engine streams to time the first
token and the gaps between tokens, and at the end decides the outcome (stop,
length, aborted, error, rejected), reports it to the metrics and logs one line
with the request id, adapter, token counts, TTFT and total time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

from ..engine.types import GenerationEvent
from ..metrics import MIX_LABEL, Metrics
from ..registry import Lease
from .errors import describe

log = logging.getLogger("loraplex.request")


def adapter_label(lease: Lease, base_id: str) -> str:
    if lease.mix:
        return MIX_LABEL
    return base_id if lease.adapter is None else (lease.name or lease.adapter)


class RequestRecord:
    def __init__(self, metrics: Metrics, *, request_id: str, route: str, model: str, adapter: str,
                 version: str = ""):
        self.metrics, self.request_id, self.route, self.model, self.adapter = metrics, request_id, route, model, adapter
        self.version = version
        self.start = time.perf_counter()
        self.first: float | None = None
        self.gaps: list[float] = []
        self.tokens = 0
        self.prompt_tokens = 0
        self.queue: float | None = None
        self.streams = 0
        self.finished: list[str] = []
        self.error: BaseException | None = None
        self.reported = False

    async def wrap(self, stream: AsyncGenerator[GenerationEvent, None]) -> AsyncGenerator[GenerationEvent, None]:
        self.streams += 1
        last = None
        try:
            async for ev in stream:
                now = time.perf_counter()
                if ev.token_ids:
                    if self.first is None:
                        self.first = now
                    if last is not None:
                        self.gaps.append(now - last)
                    last = now
                    self.tokens += len(ev.token_ids)
                if ev.queue_time is not None:
                    self.queue = max(self.queue or 0.0, ev.queue_time)
                if ev.finish_reason:
                    self.finished.append(ev.finish_reason)
                yield ev
        except Exception as e:
            self.error = e
            raise
        finally:
            await stream.aclose()

    def done(self, error: BaseException | None = None) -> None:
        """Report once: after the last event, an error, or the client leaving."""
        if self.reported:
            return
        self.reported = True
        error = error or self.error
        if error is not None:
            outcome = "rejected" if describe(error)[0] < 500 else "error"
        elif len(self.finished) < self.streams or self.streams == 0:
            outcome = "aborted"
        else:
            outcome = "length" if "length" in self.finished else "stop"
        total = time.perf_counter() - self.start
        ttft = None if self.first is None else self.first - self.start
        self.metrics.request_done(self.adapter, outcome, version=self.version, prompt_tokens=self.prompt_tokens,
                                  generation_tokens=self.tokens, ttft=ttft, itls=self.gaps,
                                  duration=total if outcome in ("stop", "length") else None, queue=self.queue)
        fields = {"request_id": self.request_id, "route": self.route, "model": self.model, "adapter": self.adapter,
                  "version": self.version, "outcome": outcome, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.tokens,
                  "ttft_ms": None if ttft is None else round(1000 * ttft, 1), "total_ms": round(1000 * total, 1)}
        if error is not None:
            fields["error"] = describe(error)[1]["error"]["message"]
        log.info("request", extra={"fields": fields})

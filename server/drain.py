"""Graceful shutdown: a uvicorn server that drains before it stops.

Owns: what SIGTERM (or Ctrl-C) means for `loraplex serve`. The first signal
marks the app as draining — `/ready` answers 503 at once and new requests get
503 (`AppState.ready` is false) — while requests already running keep
streaming. When the engine has nothing running or waiting, or after
`server.drain_timeout_s`, the engine is shut down (which ends any request
still running with a `shutting_down` error event) and uvicorn's own graceful
shutdown follows: the lifespan stops background jobs at a safe point and the
process exits 0. A second signal skips the wait.

Plain uvicorn stops accepting connections on the first signal, so a load
balancer would see refused connections instead of a 503 and a clean end.
It does not know HTTP routes; it reads the engine's counters only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("loraplex.drain")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or not self.state.ready:
            super().handle_exit(sig, frame)  # second signal, or nothing to drain: stop now
            return
        self._draining = True
        self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown (the exit status)
        self.state.draining = True
        # A signal handler may not touch the loop directly; this is the thread-safe door.
        loop = self._loop
        assert loop is not None, "set when the server started"
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        engine = self.state.engine
        log.info("draining: /ready is 503, new requests get 503; waiting up to %.0fs for %d running",
                 self.drain_timeout, engine.stats().running + engine.stats().waiting)
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            stats = engine.stats()
            if stats.running == 0 and stats.waiting == 0:
                break
            await asyncio.sleep(0.1)
        else:
            log.warning("drain timeout: ending %d running requests with an error event", engine.stats().running)
            await asyncio.to_thread(engine.shutdown)
            await asyncio.sleep(0.5)  # the streams send their error events and close
        self.should_exit = True

"""Background jobs (training, exports) run as child processes, one at a time, watched from the event loop.

Owns: the job table (id, kind, status, progress, result, error), a bounded
FIFO queue (429 beyond it), running each job as `python -m server ...
--progress json` in its own process and turning its JSON lines into progress,
the success hook (the API registers a trained adapter), cancelling (SIGTERM:
a training saves a checkpoint and stops; an export abandons its staging
folder), and stopping everything on shutdown.

Why a child process and not a thread: the engine thread owns every torch call
in the server (docs/engine-threads.md: torch work from a second thread slowed
decoding by 1.5x), a training run must not share the serving model's memory or its
failure modes, and a child can be stopped with a signal at a safe point.
It does not know what the commands do; the API builds their argument lists.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoraplexError, NotFound, Overloaded

log = logging.getLogger("loraplex.jobs")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
KEEP_FINISHED = 100            # finished jobs remembered for GET /admin/jobs/{id}
STOPPED_EXIT = 3               # `loraplex train` stopped at a checkpoint on request
NOT_PROMOTED_EXIT = 4          # `loraplex train --promote-if`: trained, its gate did not hold, kept aside
PARENT_ENV = "LORAPLEX_JOB_PARENT_PID"
MAX_SERIES = 20_000  # points kept per job (a long run's curve, without unbounded memory)
OnSuccess = Callable[["Job"], Awaitable[Any]]


@dataclass
class Job:
    id: str
    kind: str                                   # train | export
    argv: list[str]
    params: dict
    on_success: OnSuccess | None = None
    status: str = "queued"
    progress: dict = field(default_factory=dict)
    series: list[dict] = field(default_factory=list)  # training: {step, loss | eval_loss} points to plot
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    log_path: Path | None = None
    cancel_requested: bool = False
    proc: asyncio.subprocess.Process | None = None

    def public(self) -> dict:
        return {"id": self.id, "object": "job", "kind": self.kind, "status": self.status, "params": self.params,
                "progress": self.progress, "series": self.series, "result": self.result, "error": self.error,
                "created": self.created, "started": self.started, "finished": self.finished}


class JobManager:
    def __init__(self, log_dir: Path, *, max_queued: int = 8, on_finish: Callable[[str, str], None] | None = None,
                 stop_timeout: float = 60.0, program: list[str] | None = None):
        self.log_dir = Path(log_dir)
        self.program = program or [sys.executable, "-m", "server"]  # tests run small scripts instead
        self.max_queued = max_queued
        self.on_finish = on_finish or (lambda kind, status: None)
        self.stop_timeout = stop_timeout
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._running: Job | None = None

    # -- queries ------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", param="id", code="job_not_found")
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created)

    def count(self, status: str) -> int:
        return sum(1 for j in self._jobs.values() if j.status == status)

    def active(self, kind: str, key: str, value: Any) -> Job | None:
        """A queued or running job of `kind` whose params[key] == value (two trainings of one name collide)."""
        for j in self._jobs.values():
            if j.kind == kind and j.status in ("queued", "running") and j.params.get(key) == value:
                return j
        return None

    # -- lifecycle ------------------------------------------------------------------
    def submit(self, kind: str, argv: Sequence[str], params: dict, on_success: OnSuccess | None = None) -> Job:
        if len(self._queue) >= self.max_queued:
            raise Overloaded(f"{len(self._queue)} jobs are already waiting (train.max_queued_jobs); try later",
                             retry_after=30, code="too_many_jobs")
        job = Job(uuid.uuid4().hex[:16], kind, list(argv), params, on_success)
        self._jobs[job.id] = job
        self._queue.append(job)
        self._forget_old()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        self._wake.set()
        log.info("job %s (%s) queued: %s", job.id, kind, params)
        return job

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status == "queued":
            self._queue.remove(job)
            self._finish(job, "cancelled", "cancelled before it started")
        elif job.status == "running" and job.proc is not None:
            job.cancel_requested = True
            job.proc.send_signal(signal.SIGTERM)
        return job

    async def shutdown(self) -> None:
        """Cancel what waits; ask the running job to stop at a safe point, kill it after stop_timeout."""
        while self._queue:
            self._finish(self._queue.popleft(), "cancelled", "the server shut down")
        job = self._running
        if job is not None and job.proc is not None and job.proc.returncode is None:
            job.cancel_requested = True
            job.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(job.proc.wait(), self.stop_timeout)
            except TimeoutError:
                job.proc.kill()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    def _forget_old(self) -> None:
        done = [j for j in self.list() if j.status not in ("queued", "running")]
        for j in done[:-KEEP_FINISHED] if len(done) > KEEP_FINISHED else []:
            del self._jobs[j.id]

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        job.proc = None
        self.on_finish(job.kind, status)
        log.info("job %s (%s) %s%s", job.id, job.kind, status, f": {error}" if error else "")

    # -- the worker -------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            job = self._queue.popleft()
            self._running = job
            try:
                await self._run(job)
            except Exception as e:  # a job's failure is the job's, never the server's
                log.exception("job %s crashed the runner", job.id)
                if job.status == "running":
                    self._finish(job, "failed", f"{type(e).__name__}: {e}")
            finally:
                self._running = None

    async def _run(self, job: Job) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        job.log_path = self.log_dir / f"{job.id}.log"
        job.status, job.started = "running", time.time()
        # The child arms "stop when my parent dies" itself (server/cli.py): a preexec_fn would run
        # between fork and exec in a threaded server, where it can deadlock.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
        with open(job.log_path, "wb") as errlog:
            job.proc = await asyncio.create_subprocess_exec(
                *self.program, *job.argv, stdout=asyncio.subprocess.PIPE, stderr=errlog,
                env=env, limit=1 << 20)
            assert job.proc.stdout is not None
            async for raw in job.proc.stdout:
                self._event(job, raw)
            rc = await job.proc.wait()
        if job.cancel_requested:
            note = "stopped at a checkpoint; a new job with resume=true continues" if rc == STOPPED_EXIT else None
            self._finish(job, "cancelled", note or "cancelled")
            return
        if rc == NOT_PROMOTED_EXIT and job.result is not None:
            # The work succeeded and said no: nothing to register, and the result says why.
            self._finish(job, "succeeded")
            return
        if rc != 0 or job.result is None:
            self._finish(job, "failed", self._failure(job, rc))
            return
        if job.on_success is not None:
            try:
                extra = await job.on_success(job)
                if extra:
                    job.result.update(extra)
            except LoraplexError as e:
                self._finish(job, "failed", f"finished, but the follow-up failed: {e.message}")
                return
        self._finish(job, "succeeded")

    @staticmethod
    def _event(job: Job, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return  # not one of ours (a library printing to stdout)
        if not isinstance(event, dict):
            return
        kind = event.pop("event", None)
        if kind == "done":
            job.result = event
        elif kind == "progress":
            job.progress.update(event)
            point = {k: event[k] for k in ("step", "loss", "eval_loss") if k in event}
            if ("loss" in point or "eval_loss" in point) and len(job.series) < MAX_SERIES:
                job.series.append(point)
        elif kind:
            job.progress[kind] = event

    @staticmethod
    def _failure(job: Job, rc: int) -> str:
        lines = []
        if job.log_path and job.log_path.is_file():
            lines = [ln for ln in job.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        starts = [i for i, ln in enumerate(lines) if ln.startswith("loraplex ")]
        detail = "\n".join(lines[starts[-1]:][:12] if starts else lines[-5:]) or "no output"
        return f"exit status {rc}: {detail}"



def stop_with_parent() -> None:
    """In a job's child process: get SIGTERM when the server that started it dies, even by kill -9
    (Linux), so no job outlives its server; a training then saves a checkpoint, an export leaves
    only staging. Exits at once if the server is already gone."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the line above
        sys.exit(3)

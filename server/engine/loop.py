"""The real engine: one thread that owns the model and every torch call.

Owns: the waiting queue, admission of waiting requests into a batch, the
decode loop (sample → append → emit → drop finished rows → next step), aborts,
and adapter commands run between steps. Tokens go back to each request's
asyncio queue through `loop.call_soon_threadsafe`, so the event loop never
waits on torch.

Why one thread: after the main thread has run a parallel torch op, forwards on
another thread ran 1.5x slower here (facts.md); so the engine thread loads the
model itself and does all torch work, adapter reads included.

Scheduling is continuous: at every step boundary the scheduler admits waiting
requests (first come, first served, any mix of adapters, within the budgets in
`scheduler.py`); they are prefilled together and their KV caches join the
running batch; then one decode step runs for every row. Finished and aborted
rows leave at once and free their cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from ..config import EngineConfig, ModelConfig
from ..errors import LoraplexError, NotFound, NotReady, Overloaded, RequestTimeout
from ..lora.blend import BlendSpec
from ..lora.weights import AdapterInfo, describe_adapter, read_adapter
from ..model import LoadedModel, load_model
from .runner import BatchState, ModelRunner
from .sampling import RowState, make_generator, sample
from .scheduler import Budget, Waiting, admit
from .sequence import Sequence
from .tokens import HFPromptTokenizer
from .types import EngineStats, GenerationEvent, GenerationRequest

log = logging.getLogger("loraplex.engine")


@dataclass
class _Pending:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    waited: bool = False            # counted once in admission_waits


@dataclass
class _Row:
    """A running sequence: where its events go, its text state, its sampler state."""

    pending: _Pending
    seq: Sequence
    sampler: RowState

    @property
    def request_id(self) -> str:
        return self.pending.request.request_id

    @property
    def reserve(self) -> int:
        return len(self.pending.request.prompt_ids) + self.pending.request.params.max_tokens


class TorchEngine:
    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        *,
        cache_dir: Path,
        max_lora_rank: int = 64,
        loader: Callable[[ModelConfig, Path], LoadedModel] = load_model,
        on_step: Callable[[int, float], None] | None = None,
    ):
        self.model_cfg, self.cfg = model_cfg, engine_cfg
        self.cache_dir = cache_dir
        self.max_lora_rank = max_lora_rank
        self._loader = loader
        self.on_step = on_step          # (batch size, seconds) after every step; called on the engine thread
        self._running = 0               # rows in the current batch (read by stats() from other threads)
        self._kv_tokens = 0
        self._admission_waits = 0
        self._budget = Budget(engine_cfg.max_batch_size, engine_cfg.max_prefill_tokens, engine_cfg.max_kv_tokens)
        # The running batch; touched only on the engine thread.
        self._rows: list[_Row] = []
        self._state: BatchState | None = None
        self.model_id = model_cfg.id
        # _lock guards _waiting, _active, _aborted and _commands, which the event
        # loop's thread writes (submit, abort, adapter calls) while the engine
        # thread reads and pops them between steps.
        self._lock = threading.Lock()
        self._waiting: deque[_Pending] = deque()
        self._active: set[str] = set()
        self._aborted: set[str] = set()
        self._commands: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._wakeup = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._stopping = False
        self._heartbeat = time.monotonic()   # the engine loop's last turn (the watchdog reads it)
        self._thread: threading.Thread | None = None
        self._runner: ModelRunner | None = None
        self._prompt_tok: HFPromptTokenizer | None = None
        self._decoder: HFPromptTokenizer | None = None
        self._context = 0
        self._eos: list[int] = []

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="loraplex-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return (self._loaded.is_set() and self._load_error is None and not self._stopping
                and self._thread is not None and self._thread.is_alive() and not self.stalled)

    @property
    def stalled(self) -> bool:
        """The loop has not come round for engine.stall_timeout_s (it turns at least every 0.5 s when idle)."""
        return self._loaded.is_set() and time.monotonic() - self._heartbeat > self.cfg.stall_timeout_s

    async def wait_ready(self) -> None:
        await asyncio.to_thread(self._loaded.wait)
        if self._load_error is not None:
            raise self._load_error

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def tokenizer(self) -> HFPromptTokenizer:
        if self._prompt_tok is None:
            raise NotReady("the model is still loading", code="not_ready")
        return self._prompt_tok

    @property
    def context_length(self) -> int:
        return self._context

    # -- requests ------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if not self.ready:
            raise NotReady("the engine is not serving (loading or shutting down)", code="not_ready")
        pending = _Pending(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if len(self._waiting) >= self.cfg.max_waiting_requests:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (engine.max_waiting_requests="
                                 f"{self.cfg.max_waiting_requests}); retry later", retry_after=1, code="queue_full")
            self._waiting.append(pending)
            self._active.add(request.request_id)
        self._wakeup.set()
        return self._events(request.request_id, pending.queue)

    async def _events(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[GenerationEvent]:
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
            if not done:  # the consumer left early: the client is gone
                self.abort(request_id)

    def stats(self) -> EngineStats:
        gpu = None
        if self._runner is not None and self._runner.device.type == "cuda":
            gpu = torch.cuda.memory_allocated(self._runner.device)
        return EngineStats(self._running, len(self._waiting), self._kv_tokens, gpu, self._admission_waits)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._active:
                self._aborted.add(request_id)

    # -- adapters (run on the engine thread, between steps) ----------------------
    async def load_adapter(self, name: str, path: Path, *, check_rank: bool = True) -> AdapterInfo:
        def work() -> AdapterInfo:
            files = read_adapter(path, max_rank=self.max_lora_rank if check_rank else 1 << 30)
            self._runner.add_adapter(name, files)
            return files.info
        return await self._command(work)

    async def create_blend(self, name: str, spec: BlendSpec, folder: Path | None) -> AdapterInfo:
        def work() -> AdapterInfo:
            self._runner.add_blend(name, spec, folder)
            if folder is not None:
                return describe_adapter(folder)
            cfg = self._runner.peft.peft_config[name]
            return AdapterInfo(Path(), int(cfg.r), float(cfg.lora_alpha), tuple(sorted(cfg.target_modules)), "", 0)
        return await self._command(work)

    async def unload_adapter(self, name: str) -> None:
        await self._command(lambda: self._runner.remove_adapter(name))

    async def _command(self, fn: Callable[[], object]):
        if not self.ready:
            raise NotReady("the engine is not serving (loading or shutting down)", code="not_ready")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._commands.append((fn, fut))
        self._wakeup.set()
        return await asyncio.wrap_future(fut)

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                fn, fut = self._commands.popleft()
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, never kills the loop
                fut.set_exception(e)

    # -- the engine thread -----------------------------------------------------------
    def _main(self) -> None:
        try:
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            loaded = self._loader(self.model_cfg, self.cache_dir)
            self._runner = ModelRunner(loaded, lora_backend=self.cfg.lora_backend)
            log.info("batched-forward self-check passed (max logit difference %.2g)", self._runner.self_check())
            self._prompt_tok = HFPromptTokenizer(loaded.tokenizer)
            self._decoder = self._prompt_tok.clone()
            self._context, self._eos, self.model_id = loaded.context_length, loaded.eos_token_ids, loaded.model_id
        except BaseException as e:
            log.exception("model load failed")
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        log.info("engine ready: %s, budgets %s", self.model_id, self._budget)
        while not self._stopping:
            self._heartbeat = time.monotonic()
            self._run_commands()
            joining = self._admit()
            if joining:
                self._prefill(joining)
            if self._rows:
                self._decode()
            elif not joining:
                self._wakeup.wait(0.5)
                self._wakeup.clear()
        self._fail([r.pending for r in self._rows], NotReady("the server is shutting down", code="shutting_down"))
        self._fail_waiting(NotReady("the server is shutting down", code="shutting_down"))

    def _admit(self) -> list[_Pending]:
        """Pop the requests the scheduler lets join now (aborted ones are dropped on the way)."""
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._waiting if p.request.deadline is not None and now > p.request.deadline]
            for p in late:
                self._waiting.remove(p)
        if late:
            self._fail(late, _timeout())
        with self._lock:
            while self._waiting and self._waiting[0].request.request_id in self._aborted:
                self._finish(self._waiting.popleft().request.request_id)
            queue = [p for p in self._waiting if p.request.request_id not in self._aborted]
            n = admit([Waiting(len(p.request.prompt_ids), p.request.params.max_tokens) for p in queue],
                      len(self._rows), sum(r.reserve for r in self._rows), self._budget)
            joining = queue[:n]
            for p in joining:
                self._waiting.remove(p)
            for p in queue[n:]:
                if not p.waited:
                    p.waited = True
                    self._admission_waits += 1
            return joining

    def _finish(self, request_id: str) -> None:
        """Forget a request; call with _lock held."""
        self._active.discard(request_id)
        self._aborted.discard(request_id)

    def _emit(self, p: _Pending, ev: GenerationEvent) -> None:
        try:
            p.loop.call_soon_threadsafe(p.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    def _fail(self, items: list[_Pending], err: Exception) -> None:
        with self._lock:
            for p in items:
                self._finish(p.request.request_id)
        for p in items:
            self._emit(p, GenerationEvent(p.request.request_id, error=err))

    def _fail_waiting(self, err: Exception) -> None:
        with self._lock:
            items = list(self._waiting)
            self._waiting.clear()
        self._fail(items, err)

    def _prefill(self, joining: list[_Pending]) -> None:
        """Prefill the joining requests together, sample their first tokens, add them to the batch."""
        runner = self._runner
        unknown = [p for p in joining if p.request.adapter is not None and p.request.adapter not in runner.adapters]
        for p in unknown:
            self._fail([p], NotFound(f"adapter {p.request.adapter!r} is not loaded", code="model_not_found"))
        joining = [p for p in joining if p not in unknown]
        if not joining:
            return
        rows = []
        for p in joining:
            seq = Sequence(p.request, self._decoder, self._eos)
            rows.append(_Row(p, seq, RowState(p.request.params, p.request.prompt_ids, seq.output_ids,
                                              frozenset(seq.stop_ids),
                                              make_generator(p.request.params.seed, runner.device))))
        t0 = time.perf_counter()
        now = time.monotonic()
        try:
            state, logits = runner.prefill([p.request.prompt_ids for p in joining],
                                           [p.request.adapter for p in joining])
            keep = self._sample_and_emit(rows, logits, {p.request.request_id: now - p.submitted for p in joining})
            if keep:
                if len(keep) < len(rows):
                    runner.keep(state, keep)
                self._state = runner.merge(self._state, state)
                self._rows += [rows[i] for i in keep]
                self._group_rows()
        except Exception as e:
            log.exception("prefill failed; failing %d requests", len(joining))
            self._fail(joining, LoraplexError(f"engine error: {type(e).__name__}: {e}", code="engine_error"))
        self._report_step(len(rows), t0)

    def _group_rows(self) -> None:
        """Put the rows of one adapter side by side (stable: first come stays first within an
        adapter). With contiguous, equal groups the "gathered" LoRA backend reads each group as a
        view instead of gathering and scattering rows at every layer; the price is one reorder of
        the KV cache per join, which the merge has just copied anyway."""
        order = sorted(range(len(self._rows)), key=lambda i: self._rows[i].pending.request.adapter or "")
        if order != list(range(len(self._rows))):
            self._runner.keep(self._state, order)
            self._rows = [self._rows[i] for i in order]

    def _decode(self) -> None:
        """One token for every running row."""
        runner = self._runner
        now = time.monotonic()
        with self._lock:
            gone = [i for i, r in enumerate(self._rows) if r.request_id in self._aborted]
            for i in gone:
                self._finish(self._rows[i].request_id)
        late = [i for i, r in enumerate(self._rows)
                if i not in gone and r.pending.request.deadline is not None and now > r.pending.request.deadline]
        if late:
            self._fail([self._rows[i].pending for i in late], _timeout())
        if gone or late:
            self._drop(set(gone) | set(late))
            if not self._rows:
                self._report_step(0, time.perf_counter())  # the counters see the batch empty now
                return
        t0, stepped = time.perf_counter(), len(self._rows)
        try:
            logits = runner.decode(self._state, [r.seq.output_ids[-1] for r in self._rows])
            keep = self._sample_and_emit(self._rows, logits, {})
            if len(keep) < len(self._rows):
                self._drop(set(range(len(self._rows))) - set(keep))
        except Exception as e:
            log.exception("decode step failed; failing %d requests", len(self._rows))
            self._fail([r.pending for r in self._rows],
                       LoraplexError(f"engine error: {type(e).__name__}: {e}", code="engine_error"))
            self._rows, self._state = [], None
        self._report_step(stepped, t0)

    def _drop(self, rows: set[int]) -> None:
        keep = [i for i in range(len(self._rows)) if i not in rows]
        self._rows = [self._rows[i] for i in keep]
        if keep:
            self._runner.keep(self._state, keep)
        else:
            self._state = None

    def _sample_and_emit(self, rows: list[_Row], logits, queued: dict[str, float]) -> list[int]:
        """Sample one token per row, send its event; return the indices of rows still running."""
        picks = sample(logits, [r.sampler for r in rows], self._decoder.token_text)
        keep: list[int] = []
        with self._lock:
            aborted = {r.request_id for r in rows if r.request_id in self._aborted}
        for i, (r, (tok, lp)) in enumerate(zip(rows, picks)):
            if r.request_id in aborted:
                continue
            ev = r.seq.append(tok, lp)
            ev.queue_time = queued.get(r.request_id)
            self._emit(r.pending, ev)
            if not r.seq.finished:
                keep.append(i)
        with self._lock:
            for i, r in enumerate(rows):
                if i not in keep:
                    self._finish(r.request_id)
        return keep

    def _report_step(self, rows: int, t0: float) -> None:
        self._running = len(self._rows)
        width = 0 if self._state is None else int(self._state.attention_mask.shape[1])
        self._kv_tokens = len(self._rows) * width  # padded rows x cached positions
        if self.on_step is not None and rows:
            self.on_step(rows, time.perf_counter() - t0)


def _timeout() -> RequestTimeout:
    return RequestTimeout("the request ran past server.request_timeout_s and was ended", code="request_timeout")

"""The real engine: one thread that owns the model and every torch call.

Owns: the queue of submitted requests, their life in the scheduler (waiting, running,
preempted), one step per turn of the loop — schedule (`scheduler.py`) → one packed forward over
KV blocks and LoRA slots (`runner.py`) → sample → append → emit — aborts and deadlines, and the
adapter commands, which change the LoRA slots only between steps. Each step's sampled tokens
go as one batch to the output thread (`output.py`), which detokenizes, finds stop strings and
wakes each request's asyncio queue, so neither the event loop nor the engine waits on the other.

Why one thread: after the main thread has run a parallel torch op, forwards on another thread
ran 1.5x slower here (docs/engine-threads.md); so the engine thread loads the model itself and
does every forward. Reading, validating and preparing an adapter (and building a blend with PEFT), and its
copy into a free LoRA slot, happen on a loader thread while the engine keeps stepping (no token
reads a free slot; see server/lora/slots.py); unloading runs on the engine thread between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import EngineConfig, ModelConfig
from ..errors import InvalidAdapter, InvalidRequest, LoraplexError, NotFound, NotReady, Overloaded, RequestTimeout
from ..lora.blend import BlendSpec
from ..lora.slots import Prepared
from ..lora.weights import AdapterInfo, read_adapter
from ..model import LoadedModel, load_model
from .blocks import BlockManager
from .grammar import Grammars, LazyGrammars, Structured
from .live import Live, Pending, admit, split_step
from .loading import file_key, pool_blocks, prepare_blend
from .output import ErrorOut, OutputProcessor, Sink, TokenOut, events
from .runner import ModelRunner, StepItem
from .sampling import NO_TOKEN, sample
from .scheduler import Budget, Scheduler
from .sequence import token_finish
from .tokens import HFPromptTokenizer
from .types import EngineStats, GenerationEvent, GenerationRequest, adapter_names

log = logging.getLogger("loraplex.engine")
T = TypeVar("T")


class TorchEngine:
    # Set by the engine thread (_main) once the model is loaded, before it serves any request
    # or command; only that thread reads them.
    _sched: Scheduler
    _out: OutputProcessor
    _decoder: HFPromptTokenizer          # the output thread's

    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        *,
        cache_dir: Path,
        max_lora_rank: int = 64,
        slots: int = 16,
        host_adapters: int = 32,
        loader: Callable[[ModelConfig, Path], LoadedModel] = load_model,
        on_step: Callable[[int, float], None] | None = None,
    ):
        self.model_cfg, self.cfg = model_cfg, engine_cfg
        self.cache_dir = cache_dir
        self.max_lora_rank = max_lora_rank
        self.num_slots, self.host_adapters = slots, host_adapters
        self._loader = loader
        self.on_step = on_step          # (tokens in the step, seconds) after every step; on the engine thread
        self._budget = Budget(engine_cfg.max_batch_size, engine_cfg.max_num_batched_tokens,
                              engine_cfg.max_prefill_chunk)
        # Read by stats() from other threads; written by the engine thread after each step.
        self._stats = EngineStats()
        self._admission_waits = self._preemptions = 0
        # Touched only on the engine thread.
        self._blocks: BlockManager | None = None
        self._live: dict[str, Live] = {}
        # Reading and preparing adapters, building blends: off the engine thread (one at a time).
        self._host_keys: dict[str, object] = {}  # adapter name -> its files' key in the host tier
        self._loader_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loraplex-loader")
        self._host_lock = threading.Lock()  # the host tier is read by the loader, written by the engine thread
        self.model_id = model_cfg.id
        # _lock guards _waiting, _active, _aborted and _commands, which the event
        # loop's thread writes (submit, abort, adapter calls) while the engine
        # thread reads and pops them between steps.
        self._lock = threading.Lock()
        self._waiting: deque[Pending] = deque()
        self._active: set[str] = set()
        self._aborted: set[str] = set()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._wakeup = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._stopping = False
        self._heartbeat = time.monotonic()   # the engine loop's last turn (the watchdog reads it)
        self._thread: threading.Thread | None = None
        self._runner: ModelRunner | None = None
        self._prompt_tok: HFPromptTokenizer | None = None
        self._context = 0
        self._eos: list[int] = []
        self._grammars = LazyGrammars(self._build_grammars)

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

    @property
    def _runner_ready(self) -> ModelRunner:
        """The runner, for code that runs after the model loaded (engine thread, loader, adapter calls)."""
        if self._runner is None:  # an adapter call before the model is up: 503, as _off_thread says
            raise NotReady("the model is still loading", code="not_ready")
        return self._runner

    @property
    def _kv_blocks(self) -> BlockManager:
        if self._blocks is None:
            raise NotReady("the model is still loading", code="not_ready")
        return self._blocks

    # -- requests ------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if not self.ready:
            raise NotReady("the engine is not serving (loading or shutting down)", code="not_ready")
        need = len(request.prompt_ids) + request.params.max_tokens
        if self._blocks is not None and self._blocks.blocks_for(need) > self._blocks.num_blocks:
            cap = self._blocks.num_blocks * self._blocks.block_size
            raise InvalidRequest(f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                                 f"({request.params.max_tokens}) needs {need} KV-cache tokens; this server's KV pool "
                                 f"holds {cap} (engine.kv_cache_memory / engine.max_kv_tokens)",
                                 param="max_tokens", code="kv_cache_too_small")
        pending = Pending(request, Sink(asyncio.get_running_loop(), asyncio.Queue()))
        with self._lock:
            if len(self._waiting) + self._stats.waiting >= self.cfg.max_waiting_requests:
                raise Overloaded(f"{len(self._waiting) + self._stats.waiting} requests are waiting "
                                 f"(engine.max_waiting_requests={self.cfg.max_waiting_requests}); retry later",
                                 retry_after=1, code="queue_full")
            self._waiting.append(pending)
            self._active.add(request.request_id)
        self._wakeup.set()
        return events(request.request_id, pending.sink.queue, self.abort)

    def stats(self) -> EngineStats:
        st = self._stats
        if self._runner is not None and self._runner.device.type == "cuda":
            st = dataclasses.replace(st, gpu_memory_bytes=torch.cuda.memory_allocated(self._runner.device))
        with self._lock:
            queued = len(self._waiting)
            queued_adapters = {n for p in self._waiting for n in adapter_names(p.request)}
        return dataclasses.replace(st, waiting=st.waiting + queued,
                                   waiting_adapters=st.waiting_adapters | queued_adapters)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._active:
                self._aborted.add(request_id)

    async def compile_structured(self, s: Structured) -> object:
        """Compile a structured-output constraint (off the event loop); InvalidRequest if it cannot be."""
        if not self.ready:
            raise NotReady("the engine is not serving (loading or shutting down)", code="not_ready")
        return await asyncio.to_thread(self._grammars.compile, s)

    def _build_grammars(self) -> Grammars:
        vocab = int(self._runner_ready.model.get_output_embeddings().weight.shape[0])  # the logits' width
        return Grammars.from_tokenizer(self.tokenizer.clone().tok, vocab, self._eos)

    # -- adapters: prepared on the loader thread, installed between steps ----------------
    async def _off_thread(self, fn: Callable[[], T]) -> T:
        if not self.ready:
            raise NotReady("the engine is not serving (loading or shutting down)", code="not_ready")
        return await asyncio.get_running_loop().run_in_executor(self._loader_pool, fn)

    async def load_adapter(self, name: str, path: Path, *, check_rank: bool = True) -> AdapterInfo:
        runner = self._runner_ready

        def load() -> Prepared:
            key = file_key(path)
            with self._host_lock:
                hit = runner.slots.from_host(key)
            prepared = hit or runner.slots.prepare(
                name, read_adapter(path, max_rank=self.max_lora_rank if check_rank else 1 << 30))
            # Into a free slot while the engine keeps stepping (see server/lora/slots.py).
            runner.slots.install(name, prepared, identity=prepared.files.info.sha256)
            self._host_keys[name] = key
            return prepared
        info: AdapterInfo = (await self._off_thread(load)).files.info
        serving = runner.loaded.quantization
        if info.base_quantization is not None and info.base_quantization != serving:
            log.warning("adapter %s was made (LoftQ) to correct a %s base's quantization error; this base is %s, "
                        "so it adds that correction to weights that never had the error", name,
                        info.base_quantization, serving)
        return info

    async def create_blend(self, name: str, spec: BlendSpec, folder: Path) -> AdapterInfo:
        runner = self._runner_ready

        prepared, identity = await self._off_thread(lambda: prepare_blend(runner, name, spec, folder))
        await self._off_thread(lambda: runner.slots.install(name, prepared, identity=identity))
        info: AdapterInfo = prepared.files.info
        return info

    async def unload_adapter(self, name: str) -> None:
        def work() -> None:
            removed = self._runner_ready.slots.remove(name)
            if removed is None:
                return
            identity, prepared = removed
            if identity not in self._runner_ready.slots.identity_of.values():  # the same weights may be loaded twice
                self._kv_blocks.drop_identity(identity)
            with self._host_lock:
                self._runner_ready.slots.to_host(self._host_keys.pop(name, None), prepared)
        await self._command(work)

    async def _command(self, fn: Callable[[], T]) -> T:
        if not self.ready:
            raise NotReady("the engine is not serving (loading or shutting down)", code="not_ready")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
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
            blocks = pool_blocks(self.cfg, self.model_cfg, loaded)
            self._runner = ModelRunner(loaded, slots=self.num_slots, num_blocks=blocks,
                                       block_size=self.cfg.block_size, lora_backend=self.cfg.lora_backend,
                                       attention=self.cfg.attention_backend, host_adapters=self.host_adapters,
                                       cuda_graphs=self.cfg.cuda_graphs, max_rows=self.cfg.max_batch_size,
                                       max_len=loaded.context_length)
            log.info("packed-forward self-check passed (max logit difference %.2g)", self._runner_ready.self_check())
            self._blocks = BlockManager(blocks, self.cfg.block_size, prefix_caching=self.cfg.prefix_caching)
            self._sched = Scheduler(self._blocks, self._budget)
            self._prompt_tok = HFPromptTokenizer(loaded.tokenizer,
                                                 content_as_text=self.model_cfg.special_tokens_in_content == "text")
            self._decoder = self.tokenizer.clone()
            self._out = OutputProcessor(self._decoder.token_text, self.abort)
            self._out.start()
            self._context, self._eos, self.model_id = loaded.context_length, loaded.eos_token_ids, loaded.model_id
            self._report(0)
        except BaseException as e:
            log.exception("model load failed")
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        log.info("engine ready: %s, %d KV blocks of %d tokens (%.0f MiB), %d LoRA slots, budget %s", self.model_id,
                 blocks, self.cfg.block_size, self._runner_ready.kv.nbytes / 2**20, self.num_slots, self._budget)
        while not self._stopping:
            self._heartbeat = time.monotonic()
            self._run_commands()
            self._intake()
            self._reap()
            if not (self._sched.has_work() and self._step()):
                self._wakeup.wait(0.5)
                self._wakeup.clear()
        err = NotReady("the server is shutting down", code="shutting_down")
        self._fail(list(self._live.values()), err)
        self._fail_waiting(err)
        self._out.close()
        self._loader_pool.shutdown(wait=False, cancel_futures=True)

    def _intake(self) -> None:
        """Move submitted requests into the scheduler (an unknown adapter fails here)."""
        with self._lock:
            new = list(self._waiting)
            self._waiting.clear()
        slots = self._runner_ready.slots
        for p in new:
            req = p.request
            if req.request_id in self._aborted:
                with self._lock:
                    self._finish(req.request_id)
                continue
            try:
                lv = admit(p, slots, self._decoder, self._eos, self._runner_ready.device, self._grammars.grammars)
            except (NotFound, NotReady) as e:
                self._fail_pending([p], e)
                continue
            self._live[req.request_id] = lv
            self._sched.add(lv.kv)

    def _reap(self) -> None:
        """End aborted requests and those past their deadline; their blocks are freed at once."""
        now = time.monotonic()
        with self._lock:
            gone = [lv for lv in self._live.values() if lv.request_id in self._aborted]
        for lv in gone:
            self._drop(lv)
            with self._lock:
                self._finish(lv.request_id)
        late = [lv for lv in self._live.values()
                if lv.pending.request.deadline is not None and now > lv.pending.request.deadline]
        if late:
            self._fail(late, _timeout())
        if gone or late:
            self._report(0)

    def _drop(self, lv: Live) -> None:
        self._live.pop(lv.request_id, None)
        self._sched.remove(lv.kv)

    def _finish(self, request_id: str) -> None:
        """Forget a request; call with _lock held."""
        self._active.discard(request_id)
        self._aborted.discard(request_id)

    def _fail_pending(self, items: list[Pending], err: Exception) -> None:
        with self._lock:
            for p in items:
                self._finish(p.request.request_id)
        # Through the output thread, so an error never overtakes a request's earlier tokens.
        self._out.put([ErrorOut(p.sink, p.request.request_id, err) for p in items])

    def _fail(self, lives: list[Live], err: Exception) -> None:
        for lv in lives:
            self._drop(lv)
        self._fail_pending([lv.pending for lv in lives], err)

    def _fail_waiting(self, err: Exception) -> None:
        with self._lock:
            items = list(self._waiting)
            self._waiting.clear()
        self._fail_pending(items, err)

    def _step(self) -> bool:
        """Schedule and run one step; False when nothing could run."""
        sched = self._sched
        step = sched.schedule()
        self._preemptions += len(step.preempted)
        now = time.monotonic()
        for kv in sched.waiting:
            lv = self._live[kv.seq_id]
            if not lv.pending.waited and not lv.started:
                lv.pending.waited = True
                self._admission_waits += 1
        if not step.items:
            return False
        t0 = time.perf_counter()
        lives = [self._live[kv.seq_id] for kv, _ in step.items]
        items = [StepItem(kv.tokens[kv.num_computed:kv.num_computed + n], kv.num_computed, kv.block_table, lv.slot,
                          kv.num_computed + n == len(kv), lv.mix, lv.wants_prompt_logits())
                 for (kv, n), lv in zip(step.items, lives)]
        try:
            logits = self._runner_ready.run(items)
            sched.done(step)
            self._sample_and_emit(*split_step(lives, items, logits), now)
        except Exception:
            # The detail (paths, tensor shapes, library messages) goes to the log, never to clients.
            log.exception("engine step failed; failing its %d requests: %s", len(lives),
                          ", ".join(lv.request_id for lv in lives))
            for lv in lives:
                self._fail([lv], LoraplexError(f"the engine failed while generating request {lv.request_id}; the "
                                               "cause is in the server's log", code="engine_error"))
        self._report(step.num_tokens, t0)
        return True

    def _sample_and_emit(self, lives: list[Live], logits: torch.Tensor, scored: list[Live], now: float) -> None:
        """One token per sequence that reached its last token; hand the step's tokens to the
        output thread in one batch; end the sequences a token rule finished (and the scored ones)."""
        batch: list[TokenOut | ErrorOut] = []
        for lv in scored:
            batch.append(TokenOut(lv.pending.sink, lv.seq, -1, None, True, now - lv.pending.submitted,
                                  lv.scored_prompt()))
            self._drop(lv)
            with self._lock:
                self._finish(lv.request_id)
        if lives:
            # A row whose logits are not numbers (an adapter's weights gone bad) fails alone: the
            # sampler must never see it, or one tenant's row would fail the whole step.
            bad = (~torch.isfinite(logits)).any(dim=-1).tolist()  # raw logits: NaN or an overflow to inf
            if any(bad):
                keep = [i for i, b in enumerate(bad) if not b]
                failed = [lv for lv, b in zip(lives, bad) if b]
                # With an adapter the tenant's weights did it (finite, yet large enough to overflow
                # in the forward): a 422 naming it. On the bare base it is the server's fault.
                tenant = [lv for lv in failed if lv.pending.request.adapter or lv.pending.request.mix]
                if tenant:
                    self._fail(tenant, InvalidAdapter(
                        "the adapter's weights make the model produce NaN or Inf logits for this request (finite "
                        "weights whose products overflow in the forward pass); the adapter needs smaller weights",
                        code="non_finite_output"))
                base = [lv for lv in failed if lv not in tenant]
                if base:
                    self._fail(base, LoraplexError("engine error: the model produced NaN or Inf logits for this "
                                                   "request", code="engine_error"))
                lives, logits = [lives[i] for i in keep], logits[keep]
        if not lives:
            self._out.put(batch)
            return
        picks = sample(logits, [lv.sampler for lv in lives], _unnamed)  # the output thread names tokens
        with self._lock:
            aborted = {lv.request_id for lv in lives if lv.request_id in self._aborted}
        dead = [lv for lv, (tok, _) in zip(lives, picks) if tok == NO_TOKEN and lv.request_id not in aborted]
        if dead:
            self._fail(dead, InvalidRequest(
                "no token is allowed here: the request's structured-output grammar, bad_words or logit_bias "
                "exclude every token of the vocabulary", code="no_allowed_token"))
        for lv, (tok, lp) in zip(lives, picks):
            if lv.request_id in aborted or tok == NO_TOKEN:
                continue  # _reap ends an aborted one before the next step
            if lv.sampler.matcher is not None and not lv.sampler.matcher.accept_token(tok):
                raise RuntimeError(f"{lv.request_id}: the grammar refused token {tok} its own mask allowed")
            lv.kv.tokens.append(tok)
            out = lv.sampler.output_ids
            out.append(tok)
            finished = token_finish(lv.sampler.params, lv.sampler.stop_ids, tok, len(out)) is not None
            queue_time, prompt_lps = None, None
            if not lv.started:
                lv.started = True
                queue_time, prompt_lps = now - lv.pending.submitted, lv.scored_prompt()
            batch.append(TokenOut(lv.pending.sink, lv.seq, tok, lp, finished, queue_time, prompt_lps))
            if finished:
                self._drop(lv)
                with self._lock:
                    self._finish(lv.request_id)
        self._out.put(batch)

    def _report(self, tokens: int, t0: float | None = None) -> None:
        b, sched = self._kv_blocks, self._sched
        running = len(sched.running) if sched else 0
        in_batch = {id(kv) for kv in sched.running} if sched else set()
        names: tuple[set[str], set[str]] = (set(), set())  # (running, waiting)
        for lv in self._live.values():
            names[id(lv.kv) not in in_batch].update(adapter_names(lv.pending.request))
        self._stats = EngineStats(
            running=running, waiting=len(sched.waiting) if sched else 0,
            kv_cache_tokens=b.used_blocks * b.block_size if b else 0, admission_waits=self._admission_waits,
            kv_cache_capacity_tokens=b.num_blocks * b.block_size if b else 0,
            prefix_cache_queries=b.queries if b else 0, prefix_cache_hits=b.hits if b else 0,
            preemptions=self._preemptions, running_adapters=frozenset(names[0]),
            waiting_adapters=frozenset(names[1]))
        if self.on_step is not None and tokens and t0 is not None:
            self.on_step(running, time.perf_counter() - t0)


def _unnamed(token_id: int) -> str:
    return ""


def _timeout() -> RequestTimeout:
    return RequestTimeout("the request ran past server.request_timeout_s and was ended", code="request_timeout")


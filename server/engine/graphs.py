"""Decode steps in fixed shapes: captured once per shape as CUDA graphs, then replayed.

Owns: the static input buffers of a decode-only step, per bucket of (rows, key width): token
ids, positions, cache slots, each row's key slots and positions (`attention.DecodeBatch`) and
each row's LoRA slot (`LoraBatch.token_slots`); filling them from a step's items; the forward
over them; and on CUDA its capture (`torch.cuda.graph`, one memory pool for every bucket) and
replay. A step takes this path only when every item is a single-token decode and it fits the
largest bucket; prompt chunks always run eagerly (`runner.py`).

Shapes: rows are rounded up to a bucket of `ROW_BUCKETS` (padding rows decode token 0 at
position 0 into the pool's scratch slot and read only it); the key width is the batch's longest
context rounded up to a power-of-two number of blocks (padding keys read the zero slot, masked).
So a bucket's graph serves every batch of up to `rows` decodes whose contexts fit `width`.

What a captured graph holds fixed is memory addresses: the KV pool never moves, but the LoRA
pool replaces a layer's buffers when a first adapter targets it or a higher rank arrives
(`LoraPool.version`); a bucket captured before that is captured again before its next replay,
and it keeps the old buffers alive until then, so a replay never reads freed memory (the new
buffers only matter to adapters not yet published, see server/lora/slots.py).

Without CUDA nothing is captured: the same buffers and forward run eagerly, which is how the
CPU tests prove this path equals the packed step. It knows nothing of requests or adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..lora.pool import LoraBatch
from .attention import DecodeBatch, StepContext, static_decode

if TYPE_CHECKING:
    from .runner import ModelRunner, StepItem

log = logging.getLogger("loraplex.graphs")

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Bucket:
    rows: int
    width: int
    ids: torch.Tensor               # (rows,) long
    pos: torch.Tensor               # (rows,) long
    lora: torch.Tensor              # (rows,) long: LoRA slot per row, the zero slot for the base
    batch: DecodeBatch
    graph: Any = None               # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the graph's output buffer (rows, vocab)
    version: int = -1               # the LoRA pool's version at capture
    keep: list[tuple[Any, Any]] = field(default_factory=list)  # the LoRA buffers the graph reads, kept alive


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, *, max_rows: int, max_len: int, capture: bool):
        self.runner = runner
        self.rows = [b for b in ROW_BUCKETS if b < max_rows] + [max_rows]
        self.max_len = max_len
        self.capture = capture
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = self.captures = self.recaptures = 0
        self.failed = False                 # a capture raised: every step runs packed from then on

    def fits(self, items: list[StepItem]) -> bool:
        if self.failed or not 0 < len(items) <= self.rows[-1]:
            return False
        packed_only = self.runner.pool.packed_only  # trained module copies, embedding LoRA: lora/swap.py
        return (all(len(it.tokens) == 1 and it.sample and not it.mix and not it.all_logits
                    and it.slot not in packed_only for it in items)
                and max(it.pos for it in items) < self.max_len)

    def _shape(self, items: list[StepItem]) -> tuple[int, int]:
        rows = next(b for b in self.rows if b >= len(items))
        bs = self.runner.block_size
        blocks = 1
        while blocks * bs < max(it.pos for it in items) + 1:
            blocks *= 2
        return rows, min(blocks * bs, -(-self.max_len // bs) * bs)

    def _bucket(self, rows: int, width: int) -> _Bucket:
        b = self._buckets.get((rows, width))
        if b is None:
            dev = self.runner.device
            def z(*shape: int) -> torch.Tensor:
                return torch.zeros(shape, dtype=torch.long, device=dev)
            b = self._buckets[(rows, width)] = _Bucket(rows, width, z(rows), z(rows), z(rows),
                                                       DecodeBatch(z(rows), z(rows, width), z(rows, width), z(rows)))
        return b

    def _fill(self, b: _Bucket, items: list[StepItem]) -> None:
        """Write the step into the bucket's buffers in place (built on the host, one copy each)."""
        r = self.runner
        bs, n, pad = r.block_size, len(items), b.rows - len(items)
        kv = r.kv
        pos = torch.tensor([it.pos for it in items] + [0] * pad, dtype=torch.long)
        nb = b.width // bs
        tables = torch.zeros((b.rows, nb), dtype=torch.long)
        for i, it in enumerate(items):
            t = it.block_table[:nb]
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        slots = (tables.unsqueeze(2) * bs + torch.arange(bs)).reshape(b.rows, b.width)
        kpos = torch.arange(b.width).expand(b.rows, b.width).clone()
        live = kpos <= pos.unsqueeze(1)
        slots = slots.masked_fill(~live, kv.pad_slot)
        kpos = kpos.masked_fill(~live, -1)
        mapping = slots.gather(1, pos.unsqueeze(1)).squeeze(1)
        if pad:  # padding rows: token 0 at position 0, written to and read from the scratch slot
            slots[n:, 0] = kv.scratch_slot
            mapping[n:] = kv.scratch_slot
        zero = r.pool.zero_slot
        b.ids.copy_(torch.tensor([it.tokens[0] for it in items] + [0] * pad, dtype=torch.long))
        b.pos.copy_(pos)
        b.lora.copy_(torch.tensor([it.slot if it.slot >= 0 else zero for it in items] + [zero] * pad,
                                  dtype=torch.long))
        b.batch.slot_mapping.copy_(mapping)
        b.batch.slots.copy_(slots)
        b.batch.kpos.copy_(kpos)
        b.batch.qpos.copy_(pos)

    def _forward(self, b: _Bucket) -> torch.Tensor:
        r = self.runner
        b.batch._masks.clear()  # index and mask memos are per forward: the buffers' contents change
        ctx = StepContext(r.kv, b.batch, static_decode)
        r.pool.batch = LoraBatch([], b.rows, r.device, token_slots=b.lora)
        try:
            out = r.model(input_ids=b.ids.view(1, -1), position_ids=b.pos.view(1, -1), use_cache=False,
                          loraplex_step=ctx)
        finally:
            r.pool.batch = None
        logits: torch.Tensor = out.logits[0]
        return logits

    def _capture(self, b: _Bucket) -> None:
        # The loader thread may replace LoRA buffers while this runs: take the version and the
        # buffers first, so a change during the capture makes the next step capture again, and
        # every buffer the graph may have read stays alive until then.
        pool = self.runner.pool
        version = pool.version
        keep = [(layer.A, layer.B) for layer in pool.layers.values() if layer.A is not None]
        # As torch.cuda.graphs asks: warm up on a side stream first. The warm-up runs write the
        # step's keys and values, which the replay writes again, identically.
        side = torch.cuda.Stream(self.runner.device)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader thread copies adapters into slots meanwhile, which the
        # default ("global") mode would count as an unsafe call inside this capture.
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            logits = self._forward(b)
        b.graph, b.logits, b.version = graph, logits, version
        b.keep = keep + [(layer.A, layer.B) for layer in pool.layers.values() if layer.A is not None]
        self.captures += 1
        log.info("captured a decode graph for %d rows x %d keys", b.rows, b.width)

    @torch.inference_mode()
    def run(self, items: list[StepItem]) -> torch.Tensor:
        """(len(items), vocab) logits of a decode-only step, in item order."""
        b = self._bucket(*self._shape(items))
        self._fill(b, items)
        if not self.capture:
            return self._forward(b)[:len(items)]
        if b.graph is None or b.version != self.runner.pool.version:
            self.recaptures += b.graph is not None
            b.graph = b.logits = None
            b.keep = []
            try:
                self._capture(b)
            except Exception:  # never fail a step for it: the packed path serves the same tokens
                log.exception("capturing a decode graph failed; CUDA graphs are off from here on")
                self.failed = True
                b.graph = b.logits = None
                return self.runner.run_packed(items)
        assert b.graph is not None and b.logits is not None, "set by _capture"
        b.graph.replay()
        self.replays += 1
        return b.logits[:len(items)]

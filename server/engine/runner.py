"""Tensors on the engine thread: one packed forward per step over KV blocks and LoRA slots.

Owns: preparing the model once (its architecture checked against the supported families, its
attention routed to the paged function in `attention.py`, its linear layers wrapped in LoRA
slots by `server/lora/pool.py`), the KV pool, and `run(items)`: a step's token chunks from
many sequences become one flat row of tokens with explicit positions, cache slots and a LoRA
slot per token; one forward; logits for the sequences that reached their last token.

Tokens are ordered by LoRA slot inside the step (each sequence's tokens stay together), so each
adapter's tokens are one contiguous range. On CUDA with `engine.cuda_graphs`, a decode-only step
instead fills fixed buffers and replays a captured graph (`graphs.py`), verified against this
packed path at start-up and switched off (with a warning) if they differ. It knows nothing of requests, text or HTTP:
sequences are token ids, positions, block tables and slot numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..lora.pool import LoraBatch, LoraPool, Segment
from ..lora.slots import AdapterSlots
from ..model import LoadedModel
from .attention import BACKENDS as ATTENTION
from .attention import NAME as ATTN_NAME
from .attention import AttnBatch, KVPool, SeqSpan, StepContext, register
from .graphs import DecodeGraphs

log = logging.getLogger("loraplex.runner")

# Families whose transformers classes route attention through the attention interface with
# explicit position ids, and that the test suite serves against PEFT.
SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


@dataclass
class StepItem:
    """One sequence's part of a step: compute `tokens`, which sit at positions pos, pos + 1, ..."""

    tokens: list[int]
    pos: int
    block_table: list[int]
    slot: int = -1                  # LoRA slot, -1 for the base model
    sample: bool = True             # the chunk ends at the sequence's last token: return its logits
    mix: tuple[tuple[int, float], ...] = ()  # a per-request mix: (slot, weight) pairs (slot is then -1)
    all_logits: bool = False        # return the logits of every token of the chunk (prompt logprobs)

    @property
    def rows(self) -> int:
        """How many logits rows `run` returns for this item."""
        return len(self.tokens) if self.all_logits else int(self.sample)


def model_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv, head_dim


def check_architecture(model: Any) -> None:
    kind = getattr(model.config, "model_type", "?")
    if kind not in SUPPORTED:
        arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise ConfigError(f"model architecture {arch} (model_type {kind!r}) is not supported; supported: "
                          f"{', '.join(SUPPORTED)}")


class ModelRunner:
    def __init__(self, loaded: LoadedModel, *, slots: int, num_blocks: int, block_size: int,
                 lora_backend: str = "auto", attention: str = "batched", host_adapters: int = 0,
                 cuda_graphs: bool = False, max_rows: int = 32, max_len: int = 2048):
        if attention not in ATTENTION:
            raise ConfigError(f"engine.attention_backend: {attention!r} is not one of {sorted(ATTENTION)}")
        self.loaded = loaded
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        check_architecture(self.model)
        register()
        self.model.set_attn_implementation(ATTN_NAME)
        self.attention = ATTENTION[attention]
        self.block_size, self.num_blocks = block_size, num_blocks
        layers, kv, head_dim = model_geometry(self.model.config)
        self.kv = KVPool(layers, num_blocks * block_size, kv, head_dim, self.dtype, self.device)
        self.pool = LoraPool(slots, self.dtype, self.device, lora_backend)  # deltas in the activations' dtype
        head = self.model.get_output_embeddings()
        self.pool.wrap(self.model, exclude={id(head)} if head is not None else set())
        self.slots = AdapterSlots(self.pool, self.model, host_adapters)
        self._offsets = torch.arange(block_size)
        # Only on CUDA: on a CPU there is nothing to capture, and the packed step is faster there.
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self, max_rows=max_rows, max_len=min(max_len, num_blocks * block_size),
                                       capture=True)

    @property
    def adapters(self) -> set[str]:
        """Names of the adapters in LoRA slots."""
        return self.slots.names

    # -- building a step ------------------------------------------------------------------
    def _slots(self, table: list[int], upto: int) -> torch.Tensor:
        """Cache slots of positions 0..upto-1 of a sequence with this block table."""
        bt = torch.tensor(table[:-(-upto // self.block_size)], dtype=torch.long)
        return (bt.unsqueeze(1) * self.block_size + self._offsets).reshape(-1)[:upto]

    def run(self, items: list[StepItem]) -> torch.Tensor:
        """One forward over every item; (sum of item.rows, vocab) logits, in item order: an item's last
        token's row when it samples, every token's row for `all_logits` (the last is the sample row)."""
        if self.graphs is not None and self.graphs.fits(items):
            return self.graphs.run(items)
        return self.run_packed(items)

    @torch.inference_mode()
    def run_packed(self, items: list[StepItem]) -> torch.Tensor:
        """The packed step (any mix of prompt chunks and decodes), never a graph."""
        # Mixes last: their segments overlap (one per source over the same tokens).
        order = sorted(range(len(items)), key=lambda i: (bool(items[i].mix), items[i].slot))
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[torch.Tensor] = []
        spans: list[SeqSpan] = []
        segments: list[tuple[int, int, int, float]] = []   # (slot, start, end, weight) over the flat tokens
        keep: dict[int, range] = {}
        t = 0
        for i in order:
            it = items[i]
            n = len(it.tokens)
            seq_slots = self._slots(it.block_table, it.pos + n)
            spans.append(SeqSpan(t, n, it.pos, seq_slots.to(self.device)))
            slot_map.append(seq_slots[it.pos:])
            ids.extend(it.tokens)
            pos.extend(range(it.pos, it.pos + n))
            if it.slot >= 0:
                if segments and segments[-1][0] == it.slot and segments[-1][2] == t and segments[-1][3] == 1.0:
                    segments[-1] = (it.slot, segments[-1][1], t + n, 1.0)
                else:
                    segments.append((it.slot, t, t + n, 1.0))
            segments.extend((slot, t, t + n, w) for slot, w in it.mix)
            if it.rows:
                keep[i] = range(t + n - it.rows, t + n)
            t += n
        dev = self.device
        batch = AttnBatch(torch.cat(slot_map).to(dev), spans, dev, self.kv.pad_slot)
        ctx = StepContext(self.kv, batch, self.attention)
        sampled = [i for i in range(len(items)) if i in keep]
        rows = torch.tensor([r for i in sampled for r in keep[i]], dtype=torch.long, device=dev)
        self.pool.batch = LoraBatch(segments, t, dev, head_segments=self._head_segments(items, sampled, keep))
        try:
            out = self.model(input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([pos], device=dev),
                             use_cache=False, logits_to_keep=rows, loraplex_step=ctx)
        finally:
            self.pool.batch = None
        logits: torch.Tensor = out.logits[0]
        return logits

    def _head_segments(self, items: list[StepItem], sampled: list[int], keep: dict[int, range]) -> list[Segment]:
        """Segments over the head's input (the kept rows, in `sampled` order), for slots whose
        adapter has its own copy of the head; [] when none does."""
        if not self.pool.packed_only:
            return []
        segs: list[Segment] = []
        k = 0
        for i in sampled:
            n, slot = len(keep[i]), items[i].slot
            if slot >= 0:
                if segs and segs[-1][0] == slot and segs[-1][2] == k:
                    segs[-1] = (slot, segs[-1][1], k + n, 1.0)
                else:
                    segs.append((slot, k, k + n, 1.0))
            k += n
        return segs

    # -- start-up check -------------------------------------------------------------------
    def self_check(self) -> float:
        """Refuse an architecture this engine would serve wrongly.

        Two prompts packed into one step, one of them split into chunks over two steps, must give
        the logits each gives alone; returns the largest difference. Uses blocks from the start of
        the pool, before anything is served.
        """
        vocab = int(self.model.config.vocab_size)
        bs = self.block_size
        long = [(7 * i + 3) % vocab for i in range(1, 2 * bs + 4)]
        short = long[:5]
        need = -(-len(long) // bs) + -(-len(short) // bs)
        if need > self.num_blocks:
            raise ConfigError(f"the KV pool ({self.num_blocks} blocks) is too small to run the start-up check")
        t_long = list(range(-(-len(long) // bs)))
        t_short = list(range(len(t_long), len(t_long) + -(-len(short) // bs)))
        alone_long = self.run_packed([StepItem(long, 0, t_long)])[0]
        alone_short = self.run_packed([StepItem(short, 0, t_short)])[0]
        t_long2, t_short2 = t_long, t_short  # the same blocks again: every slot is rewritten before it is read
        cut = bs + 1
        self.run_packed([StepItem(long[:cut], 0, t_long2, sample=False)])
        both = self.run_packed([StepItem(long[cut:], cut, t_long2), StepItem(short, 0, t_short2)])
        diff = max(float((both[0] - alone_long).abs().max()), float((both[1] - alone_short).abs().max()))
        tol = 1e-3 if self.dtype == torch.float32 and self.loaded.quantization == "none" else 0.25
        scale = max(1.0, float(alone_long.abs().max()))
        if not diff <= tol * scale:
            arch = ", ".join(getattr(self.model.config, "architectures", None) or [type(self.model).__name__])
            raise ConfigError(f"model architecture {arch} is not supported: a packed, chunked forward differs "
                              f"from a single one by {diff:.3g}, so batched answers would be wrong")
        if self.graphs is not None:
            # One decode for each prompt, packed and then from the graph (the same keys are written twice).
            step = [StepItem([long[0]], len(long), t_long), StepItem([short[0]], len(short), t_short)]
            try:
                gdiff = float((self.graphs.run(step) - self.run_packed(step)).abs().max())
            except Exception as e:  # a model or kernel that cannot be captured
                gdiff, why = float("inf"), f"{type(e).__name__}: {e}"
            else:
                why = f"it differs from the packed step by {gdiff:.3g}"
            if not gdiff <= tol * scale:
                log.warning("CUDA graphs are off (engine.cuda_graphs): the captured decode step failed its "
                            "check, %s", why)
                self.graphs = None
        return diff

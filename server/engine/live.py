"""A request's life inside the engine: where its events go and what the engine thread keeps.

Owns: `Pending` (a submitted request and its sink, until the engine thread takes it in) and
`Live` (a request in the scheduler: its text state, which the output thread owns once created;
its sampler, whose output ids are the engine thread's own copy; its KV sequence; its LoRA slot or
mix), and `admit`, which turns one into the other against the adapters in the LoRA slots.

It also turns a step's logits rows back into each sequence's share (`split_step`: prompt
logprobs recorded, the rows to sample). It knows the slots' names and identities and the step's
items, nothing of the model or of threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import NotFound, NotReady
from ..lora.slots import AdapterSlots
from .blocks import KVSeq
from .detokenize import Decoder
from .grammar import Grammars
from .output import Sink
from .sampling import RowState, make_generator, prompt_logprobs
from .sequence import Sequence
from .types import GenerationRequest, TokenLogprob

if TYPE_CHECKING:
    from .runner import StepItem


@dataclass
class Pending:
    request: GenerationRequest
    sink: Sink
    submitted: float = field(default_factory=time.monotonic)
    waited: bool = False            # counted once in admission_waits


@dataclass(eq=False)
class Live:
    """A request inside the scheduler: where its events go, its text, sampler and KV state."""

    pending: Pending
    seq: Sequence                   # text and stop strings: the output thread's, once created
    sampler: RowState               # its output_ids are the engine thread's own copy
    kv: KVSeq
    slot: int                       # LoRA slot, -1 for the base model (and for a mix)
    mix: tuple[tuple[int, float], ...] = ()  # a per-request mix: (slot, weight) per source
    started: bool = False           # scheduled at least once (queue_time sent)
    # Prompt logprobs when asked: entry i for prompt token i + 1, filled chunk by chunk (a
    # recompute after preemption writes the same entries again).
    prompt_lps: list[TokenLogprob | None] | None = None

    def wants_prompt_logits(self) -> bool:
        """The next chunk still holds prompt tokens whose logprobs are asked for."""
        return self.prompt_lps is not None and self.kv.num_computed < len(self.pending.request.prompt_ids) - 1

    def record_prompt_logprobs(self, pos: int, logits: torch.Tensor) -> None:
        """logits: (n, V) of the chunk at positions pos..pos+n-1; row j predicts token pos+j+1."""
        prompt = self.pending.request.prompt_ids
        nxt = prompt[pos + 1:min(pos + logits.shape[0] + 1, len(prompt))]
        assert self.prompt_lps is not None, "only for a request that asked for prompt logprobs"
        for j, entry in enumerate(prompt_logprobs(logits, nxt, self.pending.request.params.prompt_logprobs or 0)):
            self.prompt_lps[pos + j] = entry

    def scored_prompt(self) -> list[TokenLogprob] | None:
        """The prompt's logprobs once the prefill scored every position (None when not asked)."""
        if self.prompt_lps is None:
            return None
        done = [lp for lp in self.prompt_lps if lp is not None]
        assert len(done) == len(self.prompt_lps), "prompt logprobs taken before the prefill ended"
        return done

    @property
    def request_id(self) -> str:
        return self.pending.request.request_id


def admit(p: Pending, slots: AdapterSlots, decoder: Decoder, eos: list[int], device: torch.device,
          grammars: Grammars | None = None) -> Live:
    """The live state of a submitted request; NotFound when an adapter it names is not in a slot
    (the registry leases what a request names, so that is a bug upstream)."""
    req = p.request
    names = ([req.adapter] if req.adapter is not None else []) + [n for n, _ in req.mix]
    missing = [n for n in names if n not in slots.slot_of]
    if missing:
        raise NotFound(f"adapter {missing[0]!r} is not loaded", code="model_not_found")
    seq = Sequence(req, decoder, eos)
    sampler = RowState(req.params, req.prompt_ids, [], frozenset(seq.stop_ids), make_generator(req.params.seed, device),
                       grammars.matcher(req.grammar) if req.grammar is not None and grammars is not None else None)
    if req.grammar is not None and sampler.matcher is None:
        raise NotReady("structured outputs are not ready in this engine", code="not_ready")
    if req.mix:  # its prefix-cache identity: the sources' identities and weights
        identity = "mix:" + ",".join(f"{slots.identity_of[n]}*{w!r}" for n, w in req.mix)
    else:
        identity = slots.identity_of[req.adapter] if req.adapter is not None else ""
    # Prompt logprobs need every prompt token's logits, so such a request skips the prefix cache.
    wants = req.params.prompt_logprobs is not None
    kv = KVSeq(req.request_id, list(req.prompt_ids), identity=identity, lookup=not wants)
    slot = slots.slot_of[req.adapter] if req.adapter is not None else -1
    return Live(p, seq, sampler, kv, slot, slots.mix_slots(req.mix) if req.mix else (),
                prompt_lps=[None] * (len(req.prompt_ids) - 1) if wants else None)


def split_step(lives: list[Live], items: list[StepItem], logits: torch.Tensor
               ) -> tuple[list[Live], torch.Tensor, list[Live]]:
    """After a step's forward: record prompt logprobs from their chunks' rows, and return
    (sequences to sample, their logits rows, sequences whose prompt was scored and that generate
    nothing: max_tokens 0). logits: (sum of item.rows, V), as `ModelRunner.run` returns them."""
    if not any(it.all_logits for it in items) and all(lv.sampler.params.max_tokens for lv in lives):
        return [lv for lv, it in zip(lives, items) if it.sample], logits, []
    rows, sampling, scored, off = [], [], [], 0
    for lv, it in zip(lives, items):
        if it.all_logits:
            lv.record_prompt_logprobs(it.pos, logits[off:off + it.rows])
        if it.sample and lv.sampler.params.max_tokens == 0:
            scored.append(lv)
        elif it.sample:
            sampling.append(lv)
            rows.append(off + it.rows - 1)
        off += it.rows
    return sampling, logits[rows], scored

"""A request's life inside the engine: where its events go and what the engine thread keeps.

Owns: `Pending` (a submitted request and its sink, until the engine thread takes it in) and
`Live` (a request in the scheduler: its text state, which the output thread owns once created;
its sampler, whose output ids are the engine thread's own copy; its KV sequence; its LoRA slot or
mix), and `admit`, which turns one into the other against the adapters in the LoRA slots.

It knows the slots' names and identities, nothing of steps, tensors or threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import NotFound
from ..lora.slots import AdapterSlots
from .blocks import KVSeq
from .detokenize import Decoder
from .output import Sink
from .sampling import RowState, make_generator
from .sequence import Sequence
from .types import GenerationRequest


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

    @property
    def request_id(self) -> str:
        return self.pending.request.request_id


def admit(p: Pending, slots: AdapterSlots, decoder: Decoder, eos: list[int], device: torch.device) -> Live:
    """The live state of a submitted request; NotFound when an adapter it names is not in a slot
    (the registry leases what a request names, so that is a bug upstream)."""
    req = p.request
    names = ([req.adapter] if req.adapter is not None else []) + [n for n, _ in req.mix]
    missing = [n for n in names if n not in slots.slot_of]
    if missing:
        raise NotFound(f"adapter {missing[0]!r} is not loaded", code="model_not_found")
    seq = Sequence(req, decoder, eos)
    sampler = RowState(req.params, req.prompt_ids, [], frozenset(seq.stop_ids), make_generator(req.params.seed, device))
    if req.mix:  # its prefix-cache identity: the sources' identities and weights
        identity = "mix:" + ",".join(f"{slots.identity_of[n]}*{w!r}" for n, w in req.mix)
    else:
        identity = slots.identity_of[req.adapter] if req.adapter is not None else ""
    kv = KVSeq(req.request_id, list(req.prompt_ids), identity=identity)
    slot = slots.slot_of[req.adapter] if req.adapter is not None else -1
    return Live(p, seq, sampler, kv, slot, slots.mix_slots(req.mix) if req.mix else ())

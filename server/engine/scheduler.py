"""Who computes how many tokens in the next step: one token budget, decodes first, then prompt chunks.

Owns: the policy, in plain Python (vLLM v1's shape). Each step:
1. every running sequence, oldest first, gets what it still has to compute: one token for a
   decode, the next chunk for a prompt being prefilled, within `max_num_batched_tokens` for the
   whole step. While any sequence is decoding, one prompt gets at most `max_prefill_chunk`
   tokens a step (so the streams' inter-token time stays near a decode step's); with nobody
   decoding, a prompt takes the whole budget (nobody is kept waiting by it). When the KV pool cannot hold a running
   sequence's next tokens, the newest running sequence is preempted: its blocks are freed and it
   goes back to the front of the waiting queue, to be recomputed later (its tokens so far are
   kept, so the client never sees an error or a different token);
2. if nothing was preempted, waiting sequences join first come first served, whatever their
   adapter (so none starves), while the budget, `max_num_seqs` and free blocks allow: each gets
   the longest prefix the cache holds for its adapter and a first chunk of the rest.
A prompt longer than the budget is therefore split over steps, and running streams keep getting
a token every step (the budget is at least `max_num_seqs`).

It knows token counts and block counts (through `BlockManager`), never tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockManager, KVSeq


@dataclass(frozen=True)
class Budget:
    max_num_seqs: int               # sequences running at once
    max_num_batched_tokens: int     # tokens computed in one step (decodes + prompt chunks)
    max_prefill_chunk: int          # most prompt tokens one sequence computes in one step

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs, or running sequences would "
                             "miss steps")


@dataclass
class Step:
    """One step's plan: (sequence, tokens to compute) in the order they were scheduled."""

    items: list[tuple[KVSeq, int]] = field(default_factory=list)
    admitted: list[KVSeq] = field(default_factory=list)    # joined the running set this step
    preempted: list[KVSeq] = field(default_factory=list)   # sent back to waiting this step

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, budget: Budget):
        self.blocks, self.budget = blocks, budget
        self.waiting: deque[KVSeq] = deque()
        self.running: list[KVSeq] = []     # admission order: the last is the newest

    def add(self, seq: KVSeq) -> None:
        self.waiting.append(seq)

    def remove(self, seq: KVSeq) -> None:
        """A sequence ends (finished, aborted, failed): forget it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _preempt(self, seq: KVSeq, step: Step) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def schedule(self) -> Step:
        step = Step()
        budget = self.budget.max_num_batched_tokens
        decoding = any(len(s) - s.num_computed == 1 for s in self.running)
        chunk = self.budget.max_prefill_chunk if decoding else budget
        scheduled: set[int] = set()
        # Decodes first, so a long prompt being prefilled never takes a running stream's token.
        order = sorted(self.running, key=lambda s: len(s) - s.num_computed > 1)
        for seq in order:
            if budget <= 0:
                break
            if seq not in self.running:  # preempted earlier in this step
                continue
            left = len(seq) - seq.num_computed
            n = min(left, budget) if left == 1 else min(left, chunk, budget)
            if n <= 0:
                continue
            while not self.blocks.can_grow(seq, n):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), seq)
                self._preempt(victim, step)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, n)
                step.items.append((seq, n))
                scheduled.add(id(seq))
                budget -= n
        if step.preempted:
            return step
        while self.waiting and budget > 0 and len(self.running) < self.budget.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match(seq)
            left = len(seq) - len(hits) * self.blocks.block_size
            n = min(left, budget) if left == 1 else min(left, chunk, budget)
            if not self.blocks.can_allocate(seq, n, hits):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, hits)
            self.blocks.grow(seq, n)
            self.running.append(seq)
            step.items.append((seq, n))
            step.admitted.append(seq)
            budget -= n
        return step

    def done(self, step: Step) -> None:
        """The step's forward ran: its tokens are in the cache."""
        for seq, n in step.items:
            self.blocks.computed(seq, n)

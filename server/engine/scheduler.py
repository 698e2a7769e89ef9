"""Who joins the running batch at the next step: the admission policy, in plain Python.

Owns: the decision, at each step boundary, of how many waiting requests (from
the head of the queue: first come, first served, whatever their adapter, so
none starves) are prefilled and join the running batch, within three budgets:
- `max_running`: sequences decoded together;
- `max_prefill_tokens`: prompt tokens prefilled in one step (a long prompt
  stalls every running stream for its prefill, so a step takes few);
- `max_kv_tokens`: KV-cache tokens reserved (prompt + max_tokens per sequence),
  so memory stays bounded; a request that does not fit waits.
The head of the queue is always admitted into an empty batch, whatever its size,
so that no request waits forever.

It knows nothing of tensors: callers pass token counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    max_running: int
    max_prefill_tokens: int
    max_kv_tokens: int


@dataclass(frozen=True)
class Waiting:
    prompt_tokens: int
    max_tokens: int

    @property
    def reserve(self) -> int:
        return self.prompt_tokens + self.max_tokens


def admit(waiting: list[Waiting], running: int, reserved: int, budget: Budget) -> int:
    """How many requests from the head of `waiting` join now.

    running: sequences in the batch; reserved: KV tokens they reserve.
    """
    n = prefill = 0
    for w in waiting:
        empty = running == 0 and n == 0
        if not empty:
            if running + n >= budget.max_running:
                break
            if prefill + w.prompt_tokens > budget.max_prefill_tokens:
                break
            if reserved + w.reserve > budget.max_kv_tokens:
                break
        n += 1
        prefill += w.prompt_tokens
        reserved += w.reserve
    return n

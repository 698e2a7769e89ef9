"""Plain engine-side types: what a request asks for and what comes back.

Owns: `SamplingParams`, `GenerationRequest`, `TokenLogprob`, `GenerationEvent`.
These are the only shapes that cross the seam between the API and an engine.
They know nothing of HTTP or of the OpenAI wire format; the API layer
converts its pydantic models into them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    seed: int | None = None         # same seed, same output
    stop: tuple[str, ...] = ()      # stop strings; the stop text is not returned
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0             # end-of-sequence is suppressed before this many tokens
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # HF style: >1 discourages tokens already seen
    presence_penalty: float = 0.0   # OpenAI style, on generated tokens
    frequency_penalty: float = 0.0
    logprobs: int | None = None     # None = off; k = the chosen token plus the top k
    min_p: float = 0.0              # 0 = off; drop tokens below min_p times the likeliest one's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # vLLM's bad_words as token sequences: a sequence's last token is banned wherever the output
    # ends with the tokens before it (a one-token sequence is banned everywhere).
    bad_words: tuple[tuple[int, ...], ...] = ()
    # None = off; k = each prompt token's logprob (from the prefill's own forward) plus the top k.
    # max_tokens may be 0 then: the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        # As vLLM (_SAMPLING_EPS): below this, logits / temperature overflows float32 and the
        # distribution is argmax's to within rounding, so the row is sampled greedily.
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None      # None = the base model
    # A per-request mix on the base: (adapter, weight) pairs; the row gets the sum of each
    # adapter's delta times its weight, which is PEFT's "cat" blend of them (adapter is then None).
    mix: tuple[tuple[str, float], ...] = ()
    deadline: float | None = None   # time.monotonic() after which the engine ends it with RequestTimeout
    # A structured-output constraint, compiled by the engine's `compile_structured` (grammar.py);
    # each token the engine samples for this request is one its grammar allows.
    grammar: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str                      # the token's own text
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (id, text, logprob), best first
    rank: int | None = None         # prompt tokens: 1 + how many tokens the model found likelier


@dataclass
class GenerationEvent:
    """One step's worth of output for one request.

    `text` is the new text since the last event (it may be empty while the
    detokenizer holds back a possible stop string or an incomplete character).
    The last event of a request has `finish_reason` set ("stop" or "length").
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None  # set when the engine failed this request
    queue_time: float | None = None  # on a request's first event: seconds it waited before its prefill
    # On a request's first event when it asked for prompt_logprobs: one per prompt token after
    # the first (the first has nothing before it to be predicted from).
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for the metrics: requests running and waiting, the KV pool, the prefix cache."""

    running: int = 0
    waiting: int = 0
    kv_cache_tokens: int = 0        # token positions of KV blocks in use (whole blocks)
    gpu_memory_bytes: int | None = None
    admission_waits: int = 0        # requests that could not start at the first step after arriving
    kv_cache_capacity_tokens: int = 0
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache (grows)
    prefix_cache_hits: int = 0      # of those, tokens found cached (grows)
    preemptions: int = 0            # sequences sent back to waiting when the KV pool ran out (grows)
    # Adapter names (not versions) of the requests in the running batch and of those waiting.
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()


def adapter_names(request: GenerationRequest) -> list[str]:
    """The registered names a request uses (its adapter, or its mix's sources): an engine name
    "name~N" (the N-th replacement, see server/entries.py) is reported as "name"."""
    keys = [request.adapter] if request.adapter else [k for k, _ in request.mix]
    return [k.split("~", 1)[0] for k in keys]

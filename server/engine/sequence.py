"""One request's generation state and the rules for when it ends.

Owns: the decision, per appended token, of what text to release and whether
the sequence is finished ("stop": an end-of-sequence token or a stop string;
"length": max_tokens reached). Every engine, real or fake, appends tokens
through `Sequence.append`, so the rules hold the same everywhere and are
tested once, without a model.
"""

from __future__ import annotations

from collections.abc import Iterable

from .detokenize import Decoder, IncrementalDetokenizer
from .types import GenerationEvent, GenerationRequest, SamplingParams, TokenLogprob


def token_finish(params: SamplingParams, stop_ids: set[int] | frozenset[int], token_id: int, n: int) -> str | None:
    """The rules that need no text, for the n-th generated token: "stop" (an end-of-sequence or
    stop token id, once min_tokens are out), "length" (max_tokens reached) or None. The engine
    thread applies them to free a sequence at once; stop strings are found later, on text."""
    if token_id in stop_ids and n > params.min_tokens:
        return "stop"
    return "length" if n >= params.max_tokens else None


class Sequence:
    def __init__(self, request: GenerationRequest, decoder: Decoder, eos_token_ids: Iterable[int]):
        self.request = request
        self.params = request.params
        self.detok = IncrementalDetokenizer(decoder, request.params.stop)
        eos = set() if request.params.ignore_eos else set(eos_token_ids)
        self.stop_ids = eos | set(request.params.stop_token_ids)
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.aborted = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.aborted

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> GenerationEvent:
        """Take one generated token; return the event to send for it."""
        assert self.finish_reason is None, "append after finish"
        self.output_ids.append(token_id)
        n = len(self.output_ids)
        rule = token_finish(self.params, self.stop_ids, token_id, n)
        if rule == "stop":
            # The end-of-sequence token itself carries no text.
            self.finish_reason = "stop"
            text = self.detok.flush()
        else:
            text = self.detok.add(token_id)
            if self.detok.stopped:
                self.finish_reason = "stop"
            elif rule == "length":
                self.finish_reason = "length"
                text += self.detok.flush()
        return GenerationEvent(
            request_id=self.request_id,
            text=text,
            token_ids=[token_id],
            logprobs=[logprob] if logprob is not None else [],
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=n,
        )

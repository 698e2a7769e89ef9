"""Choosing the next token for every row of a batch, each with its own settings.

Owns: penalties, min_tokens, temperature, top-k, top-p, seeded sampling and
logprobs, applied per row to a (batch, vocab) logits tensor. transformers'
logits processors take one setting for the whole batch, and a batch here mixes
requests with different settings, so this module does it with per-row tensors.

Order (as in vLLM and transformers): penalties → logit_bias → bad words → min_tokens mask →
grammar mask (structured outputs, `grammar.py`; last, so no bias can reach a token
the grammar forbids) → greedy argmax, or temperature → min-p → top-k → top-p → sample. Reported logprobs are those
of the model's raw distribution (log_softmax of the logits), as OpenAI and
vLLM report them.

Seeds: a row with a seed draws from its own `torch.Generator`, so its output
does not depend on what else is in the batch; rows without one share torch's
global generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .grammar import apply_masks
from .types import SamplingParams, TokenLogprob

NO_TOKEN = -1


@dataclass
class RowState:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    matcher: Any = None             # an xgrammar matcher for a constrained row; the engine advances it


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> None:
    """In place; a short loop over only the rows that ask for a penalty."""
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long, device=logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            out = torch.tensor(r.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _apply_logit_bias(logits: torch.Tensor, rows: list[RowState]) -> None:
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            ids = torch.tensor([t for t, _ in r.params.logit_bias], dtype=torch.long, device=logits.device)
            bias = torch.tensor([b for _, b in r.params.logit_bias], dtype=logits.dtype, device=logits.device)
            logits[i, ids] += bias


def _ban_bad_words(logits: torch.Tensor, rows: list[RowState]) -> None:
    for i, r in enumerate(rows):
        out = r.output_ids
        banned = [seq[-1] for seq in r.params.bad_words
                  if len(seq) == 1 or (len(out) >= len(seq) - 1 and list(seq[:-1]) == out[len(out) - len(seq) + 1:])]
        if banned:
            logits[i, torch.tensor(banned, dtype=torch.long, device=logits.device)] = float("-inf")


def _apply_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the likeliest one's. scaled: (S, V); min_p: (S,)."""
    probs = scaled.softmax(dim=-1)
    floor = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return scaled.masked_fill(probs < floor, float("-inf"))


def _mask_stops_before_min_tokens(logits: torch.Tensor, rows: list[RowState]) -> None:
    for i, r in enumerate(rows):
        if len(r.output_ids) < r.params.min_tokens and r.stop_ids:
            idx = torch.tensor(sorted(r.stop_ids), dtype=torch.long, device=logits.device)
            logits[i, idx] = float("-inf")


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort once; mask what top-k and top-p exclude. Returns (sorted logits, their ids).

    scaled: (S, V); top_k: (S,) long, 0 = off; top_p: (S,) float in (0, 1].
    """
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=scaled.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the first always stays (also
    # when top_p rounds to 0 in float32, as 1e-308 does).
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((before >= top_p.unsqueeze(1)) & (ranks > 0), float("-inf"))
    return sorted_logits, sorted_ids


def sample(
    logits: torch.Tensor,
    rows: list[RowState],
    token_text: Callable[[int], str] = str,
) -> list[tuple[int, TokenLogprob | None]]:
    """logits: (B, V), one row per entry of `rows`. Returns (token id, logprob entry) per row;
    the id is NO_TOKEN for a row whose penalties, bans and grammar leave no token to choose."""
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1) if any(r.params.logprobs is not None for r in rows) else None
    if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty for r in rows):
        logits = logits.clone()
        _apply_penalties(logits, rows)
    if any(r.params.logit_bias for r in rows):
        logits = logits.clone()
        _apply_logit_bias(logits, rows)
    if any(r.params.bad_words for r in rows):
        logits = logits.clone()
        _ban_bad_words(logits, rows)
    if any(len(r.output_ids) < r.params.min_tokens for r in rows):
        logits = logits.clone()
        _mask_stops_before_min_tokens(logits, rows)
    if any(r.matcher is not None for r in rows):
        logits = logits.clone()
        apply_masks(logits, [r.matcher for r in rows])

    device = logits.device
    tokens = torch.full((len(rows),), NO_TOKEN, dtype=torch.long, device=device)
    # A row whose rules leave no token (a grammar that dead-ends, every candidate banned) gets
    # NO_TOKEN and is failed alone by the caller; argmax would pick token 0 and multinomial would
    # raise for the whole batch.
    alive = torch.isfinite(logits).any(dim=-1).tolist()
    greedy = [i for i, r in enumerate(rows) if r.params.greedy and alive[i]]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy and alive[i]]
    if greedy:
        gi = torch.tensor(greedy, device=device)
        tokens[gi] = logits[gi].argmax(dim=-1)
    if sampled:
        si = torch.tensor(sampled, device=device)
        temps = torch.tensor([rows[i].params.temperature for i in sampled], device=device)
        scaled = logits[si] / temps.unsqueeze(1)
        min_p = torch.tensor([rows[i].params.min_p for i in sampled], device=device)
        if bool((min_p > 0).any()):
            scaled = _apply_min_p(scaled, min_p)
        top_k = torch.tensor([rows[i].params.top_k for i in sampled], dtype=torch.long, device=device)
        top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=device)
        if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
            filtered, ids = _filter_top_k_top_p(scaled, top_k, top_p)
        else:
            filtered, ids = scaled, None
        probs = filtered.softmax(dim=-1)
        picks = torch.empty(len(sampled), dtype=torch.long, device=device)
        shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        if shared:
            sj = torch.tensor(shared, device=device)
            picks[sj] = torch.multinomial(probs[sj], 1).squeeze(1)
        for j, i in enumerate(sampled):
            if rows[i].generator is not None:
                picks[j] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        tokens[si] = picks if ids is None else ids.gather(1, picks.unsqueeze(1)).squeeze(1)

    out_tokens = tokens.tolist()
    results: list[tuple[int, TokenLogprob | None]] = []
    for i, (r, tok) in enumerate(zip(rows, out_tokens)):
        entry = None
        if tok != NO_TOKEN and raw_logprobs is not None and r.params.logprobs is not None:
            lp = raw_logprobs[i]
            top: tuple[tuple[int, str, float], ...] = ()
            if r.params.logprobs > 0:
                vals, idx = lp.topk(r.params.logprobs)
                top = tuple((t, token_text(t), v) for t, v in zip(idx.tolist(), vals.tolist()))
            entry = TokenLogprob(tok, token_text(tok), float(lp[tok]), top)
        results.append((tok, entry))
    return results


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[TokenLogprob]:
    """The logprob, rank and top k of each token given the tokens before it.

    logits: (n, V), row j the model's output at the position before next_ids[j]. Raw
    log_softmax, as for generated tokens; token texts are left empty for the output thread.
    """
    lp = logits[:len(next_ids)].float().log_softmax(dim=-1)
    ids = torch.tensor(next_ids, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = (lp > chosen.unsqueeze(1)).sum(dim=-1) + 1
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())   # (n, k)
    out = []
    for j, (tid, v, rank) in enumerate(zip(next_ids, chosen.tolist(), ranks.tolist())):
        top = tuple((t, "", x) for t, x in zip(top_i[j].tolist(), top_v[j].tolist()))
        out.append(TokenLogprob(tid, "", v, top, rank))
    return out

"""The per-row sampler: each row's own settings, seeds independent of the batch."""

import math

import torch

from server.engine.sampling import RowState, make_generator, sample
from server.engine.types import SamplingParams


def row(**kw):
    seed = kw.pop("seed", None)
    p = SamplingParams(max_tokens=10, seed=seed, **kw)
    return RowState(p, prompt_ids=kw.get("prompt_ids", [0]), generator=make_generator(seed, torch.device("cpu")))


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    out = sample(logits, [row(temperature=0.0), row(temperature=0.0)])
    assert [t for t, _ in out] == [1, 0]


def test_top_k_1_is_greedy_even_when_sampling():
    logits = torch.randn(4, 50)
    out = sample(logits, [row(temperature=1.0, top_k=1) for _ in range(4)])
    assert [t for t, _ in out] == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    # probs ~ [0.6, 0.3, 0.1]: top_p=0.5 keeps only token 0; 0.8 keeps 0 and 1.
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    seen = {sample(logits, [row(temperature=1.0, top_p=0.5)])[0][0] for _ in range(50)}
    assert seen == {0}
    seen = {sample(logits, [row(temperature=1.0, top_p=0.8)])[0][0] for _ in range(200)}
    assert seen == {0, 1}


def test_seed_reproducible_and_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    alone = [sample(logits[1:2], [r])[0][0] for r in [row(temperature=1.0, seed=42)]]
    r = row(temperature=1.0, seed=42)
    in_batch = sample(logits, [row(temperature=1.0), r, row(temperature=0.0)])[1][0]
    assert alone[0] == in_batch
    a = [sample(logits[1:2], [row(temperature=1.0, seed=7)])[0][0] for _ in range(3)]
    assert len(set(a)) == 1


def test_different_seeds_differ():
    logits = torch.zeros(1, 10000)  # uniform: two seeds agreeing on 5 draws is ~impossible
    draws = lambda s: [sample(logits, [rr])[0][0] for rr in [row(temperature=1.0, seed=s)]]  # noqa: E731
    r1, r2 = row(temperature=1.0, seed=1), row(temperature=1.0, seed=2)
    seq1 = [sample(logits, [r1])[0][0] for _ in range(5)]
    seq2 = [sample(logits, [r2])[0][0] for _ in range(5)]
    assert seq1 != seq2
    assert draws(1) == draws(1)


def test_min_tokens_masks_stop_ids():
    logits = torch.tensor([[0.0, 10.0, 1.0]])
    r = row(temperature=0.0, min_tokens=2)
    r.stop_ids = frozenset({1})
    assert sample(logits, [r])[0][0] == 2
    r.output_ids = [2, 2]
    assert sample(logits, [r])[0][0] == 1


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    r = RowState(SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.5), prompt_ids=[0])
    assert sample(logits, [r])[0][0] == 1


def test_frequency_penalty_counts_outputs():
    logits = torch.tensor([[2.0, 1.5]])
    r = RowState(SamplingParams(max_tokens=5, temperature=0.0, frequency_penalty=0.3), prompt_ids=[],
                 output_ids=[0, 0])
    assert sample(logits, [r])[0][0] == 1


def test_logprobs_are_raw_log_softmax_with_top_k():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    [(tok, lp)] = sample(logits, [row(temperature=0.0, logprobs=2)], token_text=lambda t: f"<{t}>")
    ref = torch.log_softmax(logits, -1)[0]
    assert tok == 2 and lp.token == "<2>"
    assert math.isclose(lp.logprob, float(ref[2]), rel_tol=1e-6)
    assert [t for t, _, _ in lp.top] == [2, 1]
    assert sample(logits, [row(temperature=0.0)])[0][1] is None


def test_logit_bias_plus_100_forces_and_minus_100_forbids_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    best = int(logits[1].argmax())
    rows = [row(temperature=1.0, logit_bias=((7, 100.0),)), row(temperature=0.0, logit_bias=((best, -100.0),)),
            row(temperature=0.0)]
    for _ in range(20):
        out = sample(logits, rows)
        assert out[0][0] == 7
        assert out[1][0] != best and out[1][0] == int(logits[1].topk(2).indices[1])
        assert out[2][0] == int(logits[2].argmax())  # a row without a bias is untouched


def test_min_p_matches_transformers_min_p_warper():
    from transformers.generation.logits_process import MinPLogitsWarper

    torch.manual_seed(1)
    logits = torch.randn(2, 200) * 2
    ref = MinPLogitsWarper(min_p=0.2)(None, logits.clone())
    allowed = [set(torch.nonzero(torch.isfinite(ref[i])).flatten().tolist()) for i in range(2)]
    seen: list[set[int]] = [set(), set()]
    rows = [row(temperature=1.0, min_p=0.2), row(temperature=1.0, min_p=0.2)]
    for _ in range(300):
        for i, (tok, _) in enumerate(sample(logits, rows)):
            seen[i].add(tok)
    assert seen[0] <= allowed[0] and seen[1] <= allowed[1]
    assert len(seen[0]) > 1  # it still samples among the kept tokens


def test_bad_words_ban_the_last_token_after_the_rest():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    r = row(temperature=0.0, bad_words=((1,), (3, 2)))
    assert sample(logits, [r])[0][0] == 2           # token 1 banned everywhere
    r.output_ids = [3]
    assert sample(logits, [r])[0][0] == 3           # after 3, token 2 is banned too
    r.output_ids = [3, 0]
    assert sample(logits, [r])[0][0] == 2


def test_redteam_temperature_below_1e5_is_greedy_and_top_p_that_rounds_to_0_keeps_the_top():
    """Both were a 500 for the whole batch (logits / 1e-308 overflow; top_p 1e-308 is 0.0 in float32)."""
    logits = torch.randn(3, 500)
    out = sample(logits, [row(temperature=1e-308), row(temperature=1.0, top_p=1e-308), row(temperature=9e-6)])
    assert [t for t, _ in out] == logits.argmax(-1).tolist()


def test_redteam_a_row_with_no_allowed_token_gets_no_token_and_the_others_are_sampled():
    from server.engine.sampling import NO_TOKEN

    logits = torch.randn(4, 50)
    logits[1] = float("-inf")   # what a dead-ended grammar mask leaves
    logits[3] = float("-inf")
    torch.manual_seed(0)
    rows = [row(temperature=0.0), row(temperature=0.0, logprobs=2), row(temperature=1.0, seed=3), row(temperature=1.0)]
    out = sample(logits, rows)
    assert out[1] == (NO_TOKEN, None) and out[3] == (NO_TOKEN, None)
    assert out[0][0] == int(logits[0].argmax())
    alone = sample(logits[2:3], [row(temperature=1.0, seed=3)])
    assert out[2][0] == alone[0][0]

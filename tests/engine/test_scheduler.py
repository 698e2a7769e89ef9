"""The token-budget scheduler and the block manager, as tables: no tensors."""

import pytest

from server.engine.blocks import BlockManager, KVSeq
from server.engine.scheduler import Budget, Scheduler


def seq(name, n, identity=""):
    return KVSeq(name, list(range(100, 100 + n)), identity)


def run_step(s: Scheduler):
    """Schedule, mark computed, and 'sample' a token for every sequence that reached its end."""
    step = s.schedule()
    s.done(step)
    for kv, _ in step.items:
        if kv.num_computed == len(kv):
            kv.tokens.append(7)
    return step


@pytest.mark.parametrize("budget,chunk,prompts,want", [
    # budget, per-sequence chunk, prompt lengths -> tokens per sequence in the first step
    (64, 64, [10, 20], [10, 20]),
    (64, 64, [50, 30], [50, 14]),           # the budget cuts the second prompt
    (64, 16, [50, 30], [50, 14]),           # nobody decodes yet: no per-prompt cap
    (8, 8, [3, 3, 3], [3, 3, 2]),
])
def test_first_step_budget_arithmetic(budget, chunk, prompts, want):
    s = Scheduler(BlockManager(64, 4), Budget(4, budget, chunk))
    for i, n in enumerate(prompts):
        s.add(seq(f"s{i}", n))
    step = s.schedule()
    assert [n for _, n in step.items] == want
    assert step.num_tokens <= budget


def test_running_decodes_get_a_token_every_step_while_a_long_prompt_is_chunked():
    s = Scheduler(BlockManager(256, 4), Budget(4, 16, 16))
    for i in range(3):
        s.add(seq(f"d{i}", 4))
    run_step(s)                                  # three short prompts prefilled together
    s.add(KVSeq("long", list(range(1000, 1100))))  # no block in common with the short prompts
    seen = []
    for _ in range(8):
        step = run_step(s)
        got = {kv.seq_id: n for kv, n in step.items}
        assert all(got.get(f"d{i}") == 1 for i in range(3)), got   # decodes first, one token each
        seen.append(got.get("long", 0))
        assert step.num_tokens <= 16
    assert seen == [13] * 7 + [9]                 # 16 - 3 decodes per step, until the 100 are done


def test_the_chunk_cap_holds_only_while_streams_decode():
    s = Scheduler(BlockManager(256, 4), Budget(4, 64, 16))
    s.add(seq("d", 4))
    run_step(s)                                   # d is decoding from now on
    s.add(KVSeq("long", list(range(1000, 1100))))
    step = s.schedule()
    assert {kv.seq_id: n for kv, n in step.items} == {"d": 1, "long": 16}


def test_fcfs_across_adapters_and_no_starvation():
    s = Scheduler(BlockManager(256, 4), Budget(2, 64, 64))
    names = [("a", "x"), ("b", "y"), ("c", "x"), ("d", "z")]
    for n, ident in names:
        s.add(seq(n, 5, ident))
    order = []
    for _ in range(40):
        step = run_step(s)
        order += [kv.seq_id for kv in step.admitted]
        for kv, _ in step.items:
            if len(kv) >= 8:                      # three generated tokens: finished
                s.remove(kv)
    assert order == ["a", "b", "c", "d"]


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm = BlockManager(6, 4)                      # 24 token positions in all
    s = Scheduler(bm, Budget(4, 64, 64))
    old, new = seq("old", 8), seq("new", 8)      # two blocks each
    s.add(old), s.add(new)
    run_step(s)
    assert bm.used_blocks == 4                    # 2 + 2 computed; the sampled tokens get blocks when computed
    for _ in range(8):
        step = run_step(s)
        assert bm.used_blocks <= bm.num_blocks
        if step.preempted:
            break
    assert [kv.seq_id for kv in step.preempted] == ["new"] and [kv.seq_id for kv, _ in step.items] == ["old"]
    assert s.waiting and s.waiting[0] is new and new.num_computed == 0 and new.block_table == []
    assert len(new) > 9                           # its generated tokens are kept: recomputed, not lost


def test_prefix_hits_are_per_adapter_and_whole_blocks():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, Budget(4, 64, 64))
    first = seq("a1", 10, "x")
    s.add(first)
    run_step(s)
    s.remove(first)                               # finished: its two full blocks stay cached, idle
    same, other = seq("a2", 10, "x"), seq("b1", 10, "y")
    s.add(same), s.add(other)
    step = s.schedule()
    got = {kv.seq_id: n for kv, n in step.items}
    assert got == {"a2": 2, "b1": 10}             # 8 tokens cached for adapter x only
    assert same.cached_tokens == 8 and other.cached_tokens == 0
    assert not set(same.block_table) & set(other.block_table)


def test_whole_prompt_cached_still_computes_its_last_token():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, Budget(4, 64, 64))
    a = seq("a", 8)
    s.add(a)
    run_step(s)
    s.remove(a)
    b = seq("b", 8)
    s.add(b)
    step = s.schedule()
    assert [(kv.seq_id, n) for kv, n in step.items] == [("b", 4)]   # one block reused, the last recomputed


def test_dropping_an_identity_frees_its_cached_blocks():
    bm = BlockManager(8, 4)
    a = seq("a", 9, "x")
    bm.allocate(a, [])
    bm.grow(a, 9)
    bm.computed(a, 9)
    bm.free(a)
    assert bm.cached_blocks == 2 and bm.free_blocks == 8
    assert bm.drop_identity("x") == 2
    assert bm.cached_blocks == 0 and bm.match(seq("a2", 9, "x")) == []


def test_cached_blocks_are_evicted_oldest_first_when_the_pool_needs_them():
    bm = BlockManager(4, 2)
    for name in ("p", "q"):
        kv = seq(name, 4, name)
        bm.allocate(kv, [])
        bm.grow(kv, 4)
        bm.computed(kv, 4)
        bm.free(kv)
    assert bm.cached_blocks == 4
    big = seq("big", 4, "z")
    bm.allocate(big, [])
    bm.grow(big, 4)                               # needs two blocks: p's are evicted first
    assert bm.match(seq("p2", 5, "p")) == [] and len(bm.match(seq("q2", 5, "q"))) == 2
    assert bm.free_blocks == 2 and bm.used_blocks == 2


def test_budget_must_cover_every_running_sequence():
    with pytest.raises(ValueError):
        Budget(32, 16, 16)


def test_issue15_finding13_an_8191_token_prompt_never_stalls_running_streams():
    """The default budget (512 tokens a step, 64 per prompt while others decode): with 31 streams
    decoding, an 8,191-token prompt arrives; every step still gives each stream its token, and no
    step computes more than the budget, so no step grows with the prompt."""
    s = Scheduler(BlockManager(4096, 16), Budget(32, 512, 64))
    for i in range(31):
        s.add(seq(f"d{i}", 8))
    run_step(s)
    s.add(KVSeq("long", list(range(10_000, 18_191))))
    steps = 0
    while True:
        step = run_step(s)
        got = {kv.seq_id: n for kv, n in step.items}
        assert all(got.get(f"d{i}") == 1 for i in range(31)), got
        assert step.num_tokens <= 512 and got.get("long", 0) <= 64
        steps += 1
        if next(kv for kv in s.running if kv.seq_id == "long").num_computed >= 8191:
            break
    assert steps == -(-8191 // 64)

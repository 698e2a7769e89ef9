"""The admission policy as a table: (queue, running, reserved, budget) -> how many join."""

import pytest

from server.engine.scheduler import Budget, Waiting, admit

B = Budget(max_running=4, max_prefill_tokens=100, max_kv_tokens=1000)


def w(prompt, max_tokens=10):
    return Waiting(prompt, max_tokens)


@pytest.mark.parametrize("queue,running,reserved,expected", [
    ([], 0, 0, 0),
    ([w(10)] * 3, 0, 0, 3),                       # all fit
    ([w(10)] * 6, 0, 0, 4),                       # max_running
    ([w(10)] * 6, 3, 60, 1),                      # one place left
    ([w(10)] * 2, 4, 80, 0),                      # batch full
    ([w(60), w(60)], 0, 0, 1),                    # prefill budget: the second waits
    ([w(500)], 0, 0, 1),                          # alone and over every budget: admitted, never starved
    ([w(500)], 1, 20, 0),                         # over the prefill budget beside a running batch
    ([w(50, 500), w(10)], 1, 490, 0),             # KV reservation: head does not fit, and FCFS holds
    ([w(40, 400), w(40, 400)], 0, 0, 2),
    ([w(40, 400), w(40, 400), w(10)], 0, 200, 1), # 200 + 440 fits, + 440 does not
])
def test_admit(queue, running, reserved, expected):
    assert admit(queue, running, reserved, B) == expected

"""The load generator's statistics, and one short run against a live FakeEngine server."""

import pytest

from loadtest.run import Result, pct, summarize
from tests.api.test_disconnect import live  # noqa: F401  (fixture: uvicorn + FakeEngine)

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


def test_percentiles():
    assert pct([3, 1, 2], 50) == 2
    assert pct(list(range(101)), 95) == 95
    assert pct([], 50) != pct([], 50)  # nan


def test_summary_counts_only_successes():
    rs = [Result("a", ttft=0.1, gaps=[0.01, 0.02], tokens=3, total=0.13), Result("b", error="HTTP 429")]
    s = summarize(rs, wall=1.0)
    assert (s["requests"], s["errors"], s["output_tokens"], s["throughput_tok_s"]) == (2, 1, 3, 3.0)
    assert s["first_error"] == "HTTP 429" and s["ttft_p50_ms"] == 100.0


def test_run_against_live_server(live):  # noqa: F811
    from loadtest.run import main

    url, _, _ = live
    s = main(["--url", url, "--models", "fake-model", "--concurrency", "2", "--requests", "4",
              "--max-tokens", "5"])
    assert s["errors"] == 0 and s["output_tokens"] == 20
    assert s["ttft_p50_ms"] > 0

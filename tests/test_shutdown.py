"""SIGTERM on `loraplex serve` with 16 streams running: /ready and new requests turn 503 at once, the streams
finish (or, past the drain timeout, end with an error event), the process exits 0, nothing partial on disk."""

import json
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.e2e


def start(tiny_model_dir, store, tmp_path, drain_s):
    return ServerProcess(["--model", str(tiny_model_dir), "--adapters-dir", str(store)],
                         env={"LORAPLEX_MODEL__CACHE_DIR": str(tmp_path / "cache"),
                              "LORAPLEX_SERVER__DRAIN_TIMEOUT_S": str(drain_s),
                              "LORAPLEX_ENGINE__MAX_BATCH_SIZE": "2", "LORAPLEX_ENGINE__THREADS": "1"},
                         log_path=tmp_path / "server.log").wait_ready()


def stream_all(url, n=16):
    results, started = [None] * n, threading.Semaphore(0)

    def one(i):
        events = []
        body = {"model": ["alpha", "beta", "tiny-llama"][i % 3], "prompt": "hello world", "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            started.release()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        results[i] = events
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        started.acquire(timeout=60)
    return threads, results


def test_sigterm_lets_running_streams_finish(tiny_model_dir, store_copy, tmp_path):
    srv = start(tiny_model_dir, store_copy, tmp_path, drain_s=60)
    threads, results = stream_all(srv.url)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(srv.url + "/ready").status_code == 503
    r = httpx.post(srv.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    for t in threads:
        t.join(120)
    assert srv.proc.wait(60) == 0, srv.log()
    for events in results:
        assert events[-1] == "[DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert finishes == ["length"]  # all 200 tokens: the stream ran to its end
    assert not list(store_copy.rglob(".staging-*"))


def test_past_the_drain_timeout_streams_end_with_an_error_event(tiny_model_dir, store_copy, tmp_path):
    srv = start(tiny_model_dir, store_copy, tmp_path, drain_s=0.2)
    threads, results = stream_all(srv.url)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert srv.proc.wait(60) == 0, srv.log()
    ended = {"done": 0, "error": 0}
    for events in results:
        assert events, "every stream got at least its first event"
        if events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]):
            ended["done"] += 1
        else:
            errors = [json.loads(e) for e in events if e != "[DONE]" and "error" in json.loads(e)]
            assert errors and errors[-1]["error"]["code"] == "shutting_down", events[-3:]
            ended["error"] += 1
    assert ended["error"] > 0, ended  # 16 x 200 tokens at batch 2 cannot finish in 0.2 s

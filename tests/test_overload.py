"""Overload on a real server: 10x the waiting-queue bound at once gives only 200s and 429s with Retry-After,
never a 5xx or a timeout, and the server answers normally afterwards."""

import asyncio

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.e2e
QUEUE = 4


def test_ten_times_the_queue_bound(tiny_model_dir, store_copy, tmp_path):
    srv = ServerProcess(["--model", str(tiny_model_dir), "--adapters-dir", str(store_copy)],
                        env={"LORAPLEX_MODEL__CACHE_DIR": str(tmp_path / "cache"),
                             "LORAPLEX_ENGINE__MAX_WAITING_REQUESTS": str(QUEUE),
                             "LORAPLEX_ENGINE__MAX_BATCH_SIZE": "2"},
                        log_path=tmp_path / "server.log").wait_ready()
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
                async def one(i):
                    body = {"model": ["alpha", "beta", "tiny-llama"][i % 3], "prompt": "hello", "max_tokens": 60,
                            "ignore_eos": True, "stream": i % 2 == 0}
                    r = await client.post(srv.url + "/v1/completions", json=body)
                    return r.status_code, r.headers.get("retry-after"), r.text
                return await asyncio.gather(*(one(i) for i in range(10 * QUEUE)))
        results = asyncio.run(main())
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) > 0 and codes.count(200) > 0, codes
        for code, retry_after, text in results:
            if code == 429:
                assert retry_after is not None and int(retry_after) >= 1
                assert '"code":"queue_full"' in text.replace(" ", "")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        assert srv.stop() == 0

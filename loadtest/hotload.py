"""Hot-load benchmark: how long an adapter load takes, and what it does to a running stream.

    python -m loadtest.make_adapters --out adapters/.bench --prefix r16 --rank 16   # r=16, all linear layers
    python -m loadtest.hotload --url http://127.0.0.1:8000 --path .bench/r16 --loads 20

Phase 1 streams `--tokens` tokens from the base model alone and records inter-token latency
(ITL). Phase 2 streams the same while loading and unloading the adapter `--loads` times through
the admin API (POST /admin/adapters, DELETE /admin/adapters/NAME), recording each load's wall
time. Both phases run back to back in one process, so their numbers compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from .run import pct


async def stream_itl(client: httpx.AsyncClient, url: str, model: str, tokens: int, done: asyncio.Event) -> list[float]:
    body = {"model": model, "prompt": "Tell me a long story about the sea.", "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    gaps, last = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    done.set()
    return gaps


async def churn(client: httpx.AsyncClient, url: str, path: str, loads: int, headers: dict,
                stop: asyncio.Event) -> list[float]:
    times = []
    for i in range(loads):
        if stop.is_set():
            break
        name = f"hotload-{i}"
        t0 = time.perf_counter()
        r = await client.post(url + "/admin/adapters", json={"name": name, "path": path}, headers=headers)
        times.append(time.perf_counter() - t0)
        if r.status_code != 201:
            raise SystemExit(f"load failed: {r.status_code} {r.text}")
        r = await client.delete(url + f"/admin/adapters/{name}", headers=headers)
        r.raise_for_status()
    return times


def ms(values: list[float], q: float) -> float:
    return round(1000 * pct(values, q), 1)


async def main_async(a: argparse.Namespace) -> dict:
    headers = {"authorization": f"Bearer {a.admin_token}"} if a.admin_token else {}
    async with httpx.AsyncClient(timeout=600) as client:
        base = (await client.get(a.url + "/v1/models")).json()["data"][0]["id"]
        quiet = await stream_itl(client, a.url, base, a.tokens, asyncio.Event())
        done = asyncio.Event()
        stream_task = asyncio.create_task(stream_itl(client, a.url, base, a.tokens, done))
        await asyncio.sleep(0.5)  # let the stream start decoding
        loads = await churn(client, a.url, a.path, a.loads, headers, done)
        busy = await stream_task
    return {
        "loads": len(loads), "load_p50_ms": ms(loads, 50), "load_p95_ms": ms(loads, 95),
        "load_mean_ms": round(1000 * statistics.mean(loads), 1) if loads else None,
        "itl_quiet_p50_ms": ms(quiet, 50), "itl_quiet_p99_ms": ms(quiet, 99), "itl_quiet_max_ms": ms(quiet, 100),
        "itl_during_loads_p50_ms": ms(busy, 50), "itl_during_loads_p99_ms": ms(busy, 99),
        "itl_during_loads_max_ms": ms(busy, 100),
        "stream_finished_before_loads": done.is_set() and len(loads) < a.loads,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--path", required=True, help="adapter folder, relative to the server's store")
    p.add_argument("--loads", type=int, default=20)
    p.add_argument("--tokens", type=int, default=400, help="length of the measured stream")
    p.add_argument("--admin-token", default=os.environ.get("LORAPLEX_SERVER__ADMIN_TOKEN", ""))
    a = p.parse_args(argv)
    a.url = a.url.rstrip("/")
    result = asyncio.run(main_async(a))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

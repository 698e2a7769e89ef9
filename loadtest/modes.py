"""The engine-core benchmark modes of `loadtest.compare`, each against a running server.

    (f) long prompt: streams decoding while one ~3,000-token prompt arrives; their inter-token
        gaps while it is prefilled (p99) against their gaps otherwise (p50)
    (g) shared prefix: requests over 8 adapters, each with its own ~1,000-token system prompt and
        a short question: TTFT p50 and throughput (run once with the prefix cache on, once off)
    (h) hot-load under load: streams running while rank-16 all-linear adapters are loaded and
        unloaded through the admin API: load p50 / p95, and the streams' inter-token p99
        against a quiet run of the same streams
    (i) many adapters: N streams, each on its own adapter, out of 128 registered (run with 32
        slots and with 128)
Every function returns a dict of numbers; `compare.py` interleaves, prints and records them.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from .run import pct

SENTENCE = " The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill."
QUESTIONS = ["What is the fox doing?", "Where is the cat?", "Name one animal.", "Is the dog lazy?",
             "What colour is the fox?", "Who watches?", "Is it warm?", "Summarise it in three words."]


def text_of(tokens: int, seed: str = "") -> str:
    """About `tokens` tokens of text (this sentence is about 18 tokens for the default model)."""
    return seed + SENTENCE * max(1, tokens // 18)


async def stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                 times: list[float] | None = None) -> dict:
    """One streaming completion; `times` gets the arrival time of every content chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times = times if times is not None else []
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", "times": times, "t0": t0}
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() not in ("[DONE]", ""):
                times.append(time.perf_counter())
    return {"error": None, "times": times, "t0": t0}


def _client(n: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=httpx.Limits(max_connections=n + 8))


def long_prompt(url: str, models: list[str], streams: int = 31, prompt_tokens: int = 3000) -> dict:
    async def main():
        async with _client(streams) as client:
            times = [[] for _ in range(streams)]
            tasks = [asyncio.create_task(stream(client, url, models[i % len(models)], text_of(30, f"Story {i}."),
                                                400, times[i])) for i in range(streams)]
            while min(len(t) for t in times) < 5:       # every stream is decoding
                await asyncio.sleep(0.05)
            t_send = time.perf_counter()
            big = await stream(client, url, models[0], text_of(prompt_tokens, "Long document."), 4)
            t_first = big["times"][0] if big["times"] else time.perf_counter()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return times, t_send, t_first
    times, t_send, t_first = asyncio.run(main())
    during, outside = [], []
    for ts in times:
        for a, b in zip(ts, ts[1:]):
            (during if b > t_send and a < t_first else outside).append(b - a)
    p50 = pct(outside, 50)
    p99 = pct(during, 99)
    return {"prefill_s": round(t_first - t_send, 2), "itl_p50_ms": round(1000 * p50, 1),
            "itl_p99_during_prefill_ms": round(1000 * p99, 1), "ratio_p99_over_p50": round(p99 / p50, 2),
            "gaps_during": len(during)}


def shared_prefix(url: str, models: list[str], requests: int = 64, concurrency: int = 16,
                  prefix_tokens: int = 1000) -> dict:
    systems = {m: text_of(prefix_tokens, f"System prompt for {m}: you are assistant number {i}.")
               for i, m in enumerate(models)}

    def prompt(i: int) -> tuple[str, str]:
        m = models[i % len(models)]
        return m, systems[m] + "\n\nQuestion: " + QUESTIONS[(i // len(models)) % len(QUESTIONS)] + "\nAnswer:"

    async def main():
        async with _client(concurrency) as client:
            for i in range(len(models)):                # one request per adapter first (warms the cache)
                m, p = prompt(i)
                await stream(client, url, m, p, 2)
            queue = iter(range(requests))
            results = []

            async def worker():
                for i in queue:
                    m, p = prompt(i)
                    results.append(await stream(client, url, m, p, 16))
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return results, time.perf_counter() - t0
    results, wall = asyncio.run(main())
    ok = [r for r in results if r["error"] is None and r["times"]]
    ttft = [r["times"][0] - r["t0"] for r in ok]
    tokens = sum(len(r["times"]) for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok), "ttft_p50_ms": round(1000 * pct(ttft, 50), 1),
            "throughput_tok_s": round(tokens / wall, 1)}


def hot_load(url: str, model: str, paths: list[str], streams: int = 16, tokens: int = 128,
             headers: dict | None = None) -> dict:
    async def phase(churn: bool):
        async with _client(streams) as client:
            times = [[] for _ in range(streams)]
            tasks = [asyncio.create_task(stream(client, url, model, text_of(30, f"Tale {i}."), tokens, times[i]))
                     for i in range(streams)]
            while min(len(t) for t in times) < 3:
                await asyncio.sleep(0.05)
            loads = []
            window = [time.perf_counter(), None]
            if churn:
                for i, path in enumerate(paths):
                    name = f"hot-{i}"
                    t0 = time.perf_counter()
                    r = await client.post(url + "/admin/adapters", json={"name": name, "path": path},
                                          headers=headers or {})
                    loads.append(time.perf_counter() - t0)
                    if r.status_code not in (200, 201):
                        raise SystemExit(f"hot-load {path}: {r.status_code} {r.text}")
                    await client.delete(url + f"/admin/adapters/{name}", headers=headers or {})
            else:
                await asyncio.sleep(5.0)
            window[1] = time.perf_counter()
            await asyncio.gather(*tasks)
            gaps = [b - a for ts in times for a, b in zip(ts, ts[1:]) if window[0] < b and a < window[1]]
            return gaps, loads
    quiet, _ = asyncio.run(phase(False))
    busy, loads = asyncio.run(phase(True))
    q99, b99 = pct(quiet, 99), pct(busy, 99)
    return {"loads": len(loads), "load_p50_ms": round(1000 * pct(loads, 50), 1),
            "load_p95_ms": round(1000 * pct(loads, 95), 1), "itl_p99_quiet_ms": round(1000 * q99, 1),
            "itl_p99_loading_ms": round(1000 * b99, 1), "ratio": round(b99 / q99, 2)}


def many_adapters(url: str, names: list[str], streams: int = 64, tokens: int = 32) -> dict:
    async def main():
        async with _client(streams) as client:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(stream(client, url, names[i % len(names)], text_of(20, f"Note {i}."),
                                                    tokens) for i in range(streams)))
            return results, time.perf_counter() - t0
    results, wall = asyncio.run(main())
    ok = [r for r in results if r["error"] is None]
    tokens_out = sum(len(r["times"]) for r in ok)
    return {"streams": streams, "errors": len(results) - len(ok), "throughput_tok_s": round(tokens_out / wall, 1),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            "ttft_p50_ms": round(1000 * statistics.median([r["times"][0] - r["t0"] for r in ok if r["times"]]), 1)
            if ok else None}

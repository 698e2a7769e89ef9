"""Load generator: streams completions against a running loraplex (or any OpenAI-compatible) server.

    python -m loadtest.run --url http://127.0.0.1:8000 --concurrency 8 --requests 32 \
        --max-tokens 64 --models smollm2-135m-instruct,json-answer,pirate,terse

Each of `--concurrency` workers sends streaming requests back to back (models round-robin)
until `--requests` have been sent or `--duration` seconds have passed. It reports output
throughput, time to first token (TTFT) and inter-token latency (ITL) percentiles. Requests
use `ignore_eos` so every one produces exactly `--max-tokens` tokens. Only loopback targets
are meant: this is a benchmark of one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    model: str
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    tokens: int = 0
    total: float = 0.0
    error: str | None = None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    res = Result(model)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.gaps.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    res.total = time.perf_counter() - start
    return res


async def run(url: str, models: list[str], concurrency: int, requests: int, max_tokens: int, prompt: str,
              duration: float) -> tuple[list[Result], float]:
    counter = iter(range(requests))
    results: list[Result] = []
    deadline = time.perf_counter() + duration

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            results.append(await one(client, url, models[i % len(models)], prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    return {
        "requests": len(results), "errors": len(results) - len(ok), "output_tokens": tokens,
        "wall_s": round(wall, 2), "throughput_tok_s": round(tokens / wall, 1) if wall else 0.0,
        "ttft_p50_ms": round(1000 * pct([r.ttft for r in ok], 50), 1),
        "ttft_p95_ms": round(1000 * pct([r.ttft for r in ok], 95), 1),
        "itl_p50_ms": round(1000 * pct(gaps, 50), 1), "itl_p95_ms": round(1000 * pct(gaps, 95), 1),
        "itl_p99_ms": round(1000 * pct(gaps, 99), 1),
        "per_stream_tok_s": round(statistics.mean(r.tokens / r.total for r in ok if r.total), 1) if ok else 0.0,
        "first_error": next((r.error for r in results if r.error), None),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--models", default="smollm2-135m-instruct", help="comma-separated, used round-robin")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    p.add_argument("--duration", type=float, default=600.0, help="stop sending new requests after this")
    a = p.parse_args(argv)
    results, wall = asyncio.run(run(a.url.rstrip("/"), a.models.split(","), a.concurrency, a.requests,
                                    a.max_tokens, a.prompt, a.duration))
    summary = {"concurrency": a.concurrency, "models": a.models, **summarize(results, wall)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

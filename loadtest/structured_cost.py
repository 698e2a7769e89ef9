"""What a JSON-schema constraint costs in throughput: 32 streams, half of them constrained, against
32 unconstrained streams, interleaved rounds in one run on one server.

    python -m loadtest.structured_cost [--streams 32] [--tokens 64] [--rounds 3] [--dtype float32]

The constrained half asks for an array of at least 200 integers (`guided_json`), which cannot end
inside `--tokens`, so every stream of both modes runs to the same length and the batch stays full:
the difference is the mask (filled by xgrammar per constrained row, applied in the sampling step)
and nothing else. Streams cycle over the base model and the three sample adapters. Every round's
throughput is printed, then the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import httpx

from .compare import ROOT, start_server

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}
MODELS = ["smollm2-135m-instruct", "json-answer", "pirate", "terse"]


async def one_round(url: str, streams: int, tokens: int, constrained: int) -> dict:
    async def one(i: int, client: httpx.AsyncClient) -> tuple[int, str]:
        body = {"model": MODELS[i % len(MODELS)], "max_tokens": tokens, "temperature": 0.7, "seed": i,
                "messages": [{"role": "user", "content": f"List some numbers, please ({i})."}]}
        body.update({"guided_json": SCHEMA} if i < constrained else {"ignore_eos": True})
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        out = r.json()
        return out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i, client) for i in range(streams)))
        wall = time.perf_counter() - t0
    toks = sum(n for n, _ in results)
    return {"tok_s": toks / wall, "tokens": toks, "wall_s": wall,
            "finishes": sorted({f for _, f in results})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--port", type=int, default=8741)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as store:
        for name in MODELS[1:]:
            os.symlink(ROOT / "adapters" / name, f"{store}/{name}")
        proc = start_server(args.dtype, args.port, store, env={"LORAPLEX_ADAPTERS__ROOTS": str(ROOT / "adapters")})
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(one_round(url, args.streams, 4, args.streams // 2))  # warm-up: compiles the schema once
            rounds: dict[str, list[dict]] = {"none": [], "half": []}
            for k in range(args.rounds):
                for mode, constrained in (("none", 0), ("half", args.streams // 2)):
                    r = asyncio.run(one_round(url, args.streams, args.tokens, constrained))
                    rounds[mode].append(r)
                    print(f"round {k + 1} {mode:>4}: {r['tok_s']:7.1f} tok/s ({r['tokens']} tokens in "
                          f"{r['wall_s']:.1f} s, finishes {r['finishes']})", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    med = {m: statistics.median(x["tok_s"] for x in rs) for m, rs in rounds.items()}
    out = {"streams": args.streams, "tokens": args.tokens, "median_tok_s": med,
           "half_constrained_over_none": med["half"] / med["none"], "rounds": rounds}
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}, indent=2))
    return out


if __name__ == "__main__":
    main()

"""Canary split: how a weighted alias divides real traffic, read back from the server's own metrics.

    python -m loadtest.canary_split --url http://127.0.0.1:8000 --alias canary \
        --target pirate=0.9 --target terse=0.1 --requests 1000

It points `--alias` at the targets (PUT /admin/aliases/ALIAS), sends `--requests` one-token
completions to the alias, each with its own `user` (the seed of the choice), and reports how many
each (adapter, version) served, from the difference of `loraplex_requests_total` before and after:
what the dashboard would show. It then checks the choice is reproducible: the same user again
lands where it landed. Rounds of `--round` requests are printed as they finish.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def served_by(client: httpx.AsyncClient, url: str) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    text = (await client.get(url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "loraplex_requests_total":
                out[(s.labels["adapter"], s.labels["version"])] += s.value
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--alias", default="canary")
    ap.add_argument("--target", action="append", required=True, help="MODEL=WEIGHT (repeat)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--round", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    targets = [{"model": t.split("=")[0], "weight": float(t.split("=")[1])} for t in args.target]
    headers = {"Authorization": f"Bearer {os.environ['LORAPLEX_ADMIN_TOKEN']}"} \
        if os.environ.get("LORAPLEX_ADMIN_TOKEN") else {}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        r = await client.put(f"{args.url}/admin/aliases/{args.alias}", json={"targets": targets})
        r.raise_for_status()
        print("alias", args.alias, "->",
              [(t["model"], t["version"], round(t["weight"], 3)) for t in r.json()["targets"]])
        sem = asyncio.Semaphore(args.concurrency)

        async def one(user: str) -> None:
            async with sem:
                body = {"model": args.alias, "prompt": "Hello", "max_tokens": 1, "user": user}
                (await client.post(args.url + "/v1/completions", json=body)).raise_for_status()

        start = await served_by(client, args.url)
        for first in range(0, args.requests, args.round):
            users = [f"user-{i}" for i in range(first, min(first + args.round, args.requests))]
            await asyncio.gather(*(one(u) for u in users))
            now = await served_by(client, args.url)
            print(f"after {first + len(users):5d}:", {f"{a}@{v}": int(now[(a, v)] - start[(a, v)])
                                                     for a, v in sorted(now) if now[(a, v)] > start[(a, v)]})
        delta = {k: now[k] - start[k] for k in now if now[k] > start[k]}
        total = sum(delta.values())
        print(f"\nsplit over {int(total)} requests:")
        weights = {t["model"].split("@")[0]: t["weight"] / sum(x["weight"] for x in targets) for t in targets}
        for (adapter, version), n in sorted(delta.items()):
            w = weights.get(adapter, 0.0)
            sd = math.sqrt(total * w * (1 - w)) or 1.0
            print(f"  {adapter}@{version}: {int(n)} ({100 * n / total:.1f} %; expected {100 * w:.1f} %, "
                  f"{(n - total * w) / sd:+.2f} sd)")
        # Reproducible: the first round's users again, counted the same way.
        before = await served_by(client, args.url)
        await asyncio.gather(*(one(f"user-{i}") for i in range(args.round)))
        again = await served_by(client, args.url)
        first_round = {k: again[k] - before[k] for k in again if again[k] > before[k]}
        print("the first", args.round, "users again:", {f"{a}@{v}": int(n) for (a, v), n in first_round.items()})


if __name__ == "__main__":
    asyncio.run(main())

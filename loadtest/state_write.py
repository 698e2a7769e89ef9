"""How long an admin change's state write stalls the event loop (and so every stream): the old
way (the write and its fsyncs on the loop) against `StateFile.save` (on a worker thread), and
the ticker's own jitter with no write at all.

    python -m loadtest.state_write [--adapters 200] [--rounds 5] [--writes 40] [--dir PATH]

A ticker coroutine wakes every millisecond; the loop's stall is the longest gap it sees beyond
that, over `--writes` state writes of a registry of `--adapters` records. Rounds alternate the two
ways and every round is printed, then the medians and their ratio. Use `--dir` on the disk the
store lives on: fsync's cost is the disk's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from server.state import Record, State, StateFile


async def _stall(write, writes: int) -> tuple[float, float]:
    """(longest loop stall, median write time) in ms over `writes` writes."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    took = []
    for _ in range(writes):
        t0 = time.perf_counter()
        await write()
        took.append(time.perf_counter() - t0)
        await asyncio.sleep(0.003)  # admin changes come one at a time: the ticker runs between them
    done = True
    await tick
    return 1000 * max(gaps), 1000 * statistics.median(took)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writes", type=int, default=40)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        sf = StateFile(Path(tmp))
        state = State([Record(f"adapter-{i:03d}", "adapter", f"adapter-{i:03d}", i % 7 == 0, "ab" * 32, None,
                              1764633600) for i in range(a.adapters)])

        async def on_loop() -> None:
            sf.write(state)

        async def off_loop() -> None:
            await sf.save(lambda: state)

        async def idle() -> None:  # the ticker's own jitter: the floor of both
            pass
        ways = (("on the loop", on_loop), ("worker thread", off_loop), ("no write", idle))
        results: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in ways}
        print(f"{a.adapters} records, {a.writes} writes a round; loop stall = longest ticker gap (ms)")
        for r in range(a.rounds):
            for label, fn in ways[:: 1 if r % 2 == 0 else -1]:
                stall, took = asyncio.run(_stall(fn, a.writes))
                results[label].append((stall, took))
                print(f"round {r + 1}  {label:14s} stall max {stall:7.2f} ms   write p50 {took:6.2f} ms")
        med = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
        print(f"median stall: on the loop {med['on the loop']:.2f} ms, worker thread {med['worker thread']:.2f} ms "
              f"(ratio {med['on the loop'] / max(med['worker thread'], 1e-3):.1f}x), no write {med['no write']:.2f} ms")


if __name__ == "__main__":
    main()

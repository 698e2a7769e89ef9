"""The engine on random-weight models of realistic shapes, in process: throughput, latency, roofline.

    python -m loadtest.gpu_bench --shape smollm2-135m --shape llama-8b --streams 32,128,256 --tokens 128
    python -m loadtest.gpu_bench --device cpu --dtype float32 --shape smollm2-135m --streams 4 --tokens 8   # smoke

For each shape (loadtest/shapes.py: built on the device in its dtype, no file) one TorchEngine
serves, at each stream count, interleaved in rounds:
  base      no adapter
  one       every stream on one rank-16 all-linear adapter
  mixed8    8 rank-16 all-linear adapters round-robin
  distinct  every stream on its own rank-8 q/v adapter (32 of them; more streams share them)
  one-r64   every stream on one rank-64 all-linear adapter
each stream decoding `--tokens` tokens (ignore_eos) after a 32-token prompt. Per mode: tokens/s,
TTFT p50/p95, inter-token p50/p99, the median decode step (the engine's own step timer, steps
with every stream decoding), and that step against the roofline: the bytes a step must read
(weights once, the KV cache so far, the adapters in the batch) over --bandwidth, or the FLOPs
(2 per weight per token) over --flops, whichever is longer. Every round is printed; the JSON
(--out) keeps them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from loadtest import shapes
from loadtest.run import pct

MODES = ("base", "one", "mixed8", "distinct", "one-r64")
PROMPT = 32


def adapter_of(mode: str, i: int) -> str | None:
    return {"base": None, "one": "r16-all-0", "mixed8": f"r16-all-{i % 8}", "distinct": f"r8-qv-{i % 32}",
            "one-r64": "r64-all-0"}[mode]


def adapters_needed(modes: list[str]) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    if "one" in modes or "mixed8" in modes:
        out.update({f"r16-all-{k}": (16, "all") for k in range(8 if "mixed8" in modes else 1)})
    if "distinct" in modes:
        out.update({f"r8-qv-{k}": (8, "qv") for k in range(32)})
    if "one-r64" in modes:
        out["r64-all-0"] = (64, "all")
    return out


async def run_mode(eng, mode: str, streams: int, tokens: int, steps: list) -> dict:
    from server.engine.types import GenerationRequest, SamplingParams

    prompt = (eng.tokenizer.encode("the quick brown fox jumps over the lazy dog ") * 8)[:PROMPT]
    ttft, itl = [], []

    async def one(i: int) -> int:
        req = GenerationRequest(f"{mode}-{streams}-{i}-{time.monotonic_ns()}", prompt,
                                SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                                adapter_of(mode, i))
        t0 = last = time.perf_counter()
        n = 0
        async for ev in eng.submit(req):
            now = time.perf_counter()
            for _ in ev.token_ids:
                if n == 0:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                n += 1
            last = now
        return n

    steps.clear()
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    full = [s for n, s in list(steps) if n == streams]
    return {"tokens": sum(counts), "seconds": wall, "tok_s": sum(counts) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p95_ms": 1e3 * pct(ttft, 95),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "step_ms": 1e3 * statistics.median(full) if full else float("nan"), "full_steps": len(full)}


def roofline_ms(shape: str, mode: str, streams: int, tokens: int, elem: int, bw: float, flops: float) -> float:
    s = shapes.SHAPES[shape]
    weights = shapes.parameters(shape) * elem
    kv_dim = s["hidden_size"] // s["num_attention_heads"] * s["num_key_value_heads"]
    kv = 2 * s["num_hidden_layers"] * kv_dim * elem * streams * (PROMPT + tokens / 2)   # mean context
    ranks = {a: r for a, (r, _) in adapters_needed([mode]).items()}
    lora = 0
    per_layer_all = 2 * s["hidden_size"] + 2 * kv_dim + 3 * (s["hidden_size"] + s["intermediate_size"])
    per_layer_qv = 2 * s["hidden_size"] + 2 * (s["hidden_size"] + kv_dim)
    for name in {adapter_of(mode, i) for i in range(streams)} - {None}:
        width = per_layer_qv if "qv" in str(name) else per_layer_all
        lora += ranks[name] * width * s["num_hidden_layers"] * elem
    t_bytes = (weights + kv + lora) / bw
    t_flops = 2 * shapes.parameters(shape) * streams / flops
    return 1e3 * max(t_bytes, t_flops)


async def bench_shape(args, shape: str, out: list) -> None:
    from server.config import load_config
    from server.engine.loop import TorchEngine

    modes = args.modes.split(",")
    streams_list = [int(x) for x in args.streams.split(",")]
    cfg = load_config(overrides={"model.device": args.device, "model.dtype": args.dtype,
                                 "engine.max_batch_size": max(streams_list),
                                 "engine.max_num_batched_tokens": max(2048, max(streams_list)),
                                 "engine.max_prefill_chunk": 512, "engine.cuda_graphs": not args.no_graphs,
                                 "engine.max_waiting_requests": 4 * max(streams_list)})
    steps: list = []
    need = adapters_needed(modes)
    eng = TorchEngine(cfg.model, cfg.engine, cache_dir=Path(tempfile.gettempdir()), max_lora_rank=64,
                      slots=max(8, len(need)), host_adapters=len(need) + 8, loader=shapes.loader_for(shape),
                      on_step=lambda n, s: steps.append((n, s)))
    eng.start()
    elem = 2 if args.dtype in ("bfloat16", "float16") else 4
    try:
        await eng.wait_ready()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            for k, (name, (rank, targets)) in enumerate(need.items()):
                await eng.load_adapter(name, shapes.write_adapter(shape, Path(tmp) / name, rank, targets, k))
            print(f"{shape}: {shapes.parameters(shape) / 1e9:.2f} B parameters, {len(need)} adapters loaded in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        await run_mode(eng, modes[0], min(streams_list), 4, steps)   # warm-up (graphs captured, kernels compiled)
        for rnd in range(args.rounds):
            for streams in streams_list:
                for mode in modes:
                    r = await run_mode(eng, mode, streams, args.tokens, steps)
                    roof = roofline_ms(shape, mode, streams, args.tokens, elem, args.bandwidth, args.flops)
                    r.update(shape=shape, mode=mode, streams=streams, round=rnd, roofline_step_ms=roof,
                             roofline_fraction=roof / r["step_ms"] if r["step_ms"] == r["step_ms"] else None)
                    out.append(r)
                    frac = f"{100 * r['roofline_fraction']:.0f} %" if r["roofline_fraction"] else "-"
                    print(f"  round {rnd} {streams:>4} streams {mode:9} {r['tok_s']:9.1f} tok/s  TTFT p50 "
                          f"{r['ttft_p50_ms']:7.1f} p95 {r['ttft_p95_ms']:7.1f} ms  ITL p50 {r['itl_p50_ms']:6.2f} "
                          f"p99 {r['itl_p99_ms']:6.2f} ms  step {r['step_ms']:6.2f} ms ({frac} of the roofline "
                          f"{roof:.2f} ms)", flush=True)
    finally:
        eng.shutdown()


def summary(out: list) -> None:
    """Each mode's median over rounds, and mixed8 / base (the adapters' cost)."""
    keys = sorted({(r["shape"], r["streams"]) for r in out})
    for shape, streams in keys:
        med = {m: statistics.median(r["tok_s"] for r in out if (r["shape"], r["streams"], r["mode"]) ==
                                    (shape, streams, m))
               for m in MODES if any(r["mode"] == m and r["shape"] == shape and r["streams"] == streams for r in out)}
        ratios = " ".join(f"{m}/base {v / med['base']:.2f}" for m, v in med.items() if "base" in med and m != "base")
        print(f"{shape} {streams} streams: " + " ".join(f"{m} {v:.0f}" for m, v in med.items()) + f" tok/s; {ratios}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=sorted(shapes.SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--streams", default="32,128,256")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-graphs", action="store_true", help="decode steps eagerly (no CUDA graphs)")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s of device memory (H200 HBM3e)")
    p.add_argument("--flops", type=float, default=790e12, help="dense bf16 FLOP/s measured on the H200")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out: list = []
    for shape in args.shape or ["smollm2-135m"]:
        asyncio.run(bench_shape(args, shape, out))
    summary(out)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Throughput of 1 vs N Ray Serve replicas on this machine, in one run.

    python -m loadtest.ray_compare [--replicas 2] [--streams 16] [--tokens 64] [--out FILE]

For each replica count (1, then N) it starts a local Ray instance, deploys `server.scaleout`
with the repository's config.toml (the default model and the adapters in adapters/), splits
the machine's cores between the replicas (torch threads per replica = cores / replicas),
runs the load generator through the router with streams spread over the base model and every
adapter in the store, reads the affinity counters from GET /cluster, and shuts Ray down.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def one(replicas: int, streams: int, tokens: int, port: int) -> dict:
    import ray
    from ray import serve

    from server.scaleout import build_app

    cores = os.cpu_count() or 2
    threads = max(1, cores // replicas)
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app({"config": str(ROOT / "config.toml"), "replicas": replicas, "cpus_per_replica": 0,
                             "env": {"LORAPLEX_ENGINE__THREADS": str(threads)}}), name="loraplex", route_prefix="/")
        start_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        from .run import main as run

        run(["--url", url, "--models", ",".join(models), "--concurrency", str(streams), "--requests",
             str(streams), "--max-tokens", "4"])
        res = run(["--url", url, "--models", ",".join(models), "--concurrency", str(streams), "--requests",
                   str(2 * streams), "--max-tokens", str(tokens)])
        time.sleep(1.0)  # replicas report twice a second
        reps = httpx.get(url + "/cluster").json()["replicas"]
        hits = sum(sum(r["hits"].values()) for r in reps.values())
        loads = sum(sum(r["loads"].values()) for r in reps.values())
        return {"replicas": replicas, "torch_threads_each": threads, "start_s": round(start_s, 1),
                "throughput_tok_s": res["throughput_tok_s"], "ttft_p50_ms": res["ttft_p50_ms"],
                "itl_p50_ms": res["itl_p50_ms"], "errors": res["errors"], "affinity_hits": hits,
                "adapter_loads": loads, "models": models}
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = [one(n, a.streams, a.tokens, a.port) for n in (1, a.replicas)]
    report = {"runs": runs, "ratio": round(runs[1]["throughput_tok_s"] / runs[0]["throughput_tok_s"], 3)}
    print(json.dumps(report, indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

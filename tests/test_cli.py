"""The `loraplex` command: bad configuration fails fast with a message naming the key."""

import subprocess
import sys

import pytest

from server.cli import build_parser

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


def run_cli(*args, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_wrong_model_path_fails_fast(tmp_path):
    r = run_cli("serve", "--model", str(tmp_path / "nothing"), "--port", "1")
    assert r.returncode == 2
    assert "model.model" in r.stderr and "nothing" in r.stderr


def test_bad_environment_value_names_the_variable():
    r = run_cli("serve", env={"LORAPLEX_SERVER__PORT": "eighty"})
    assert r.returncode == 2 and "LORAPLEX_SERVER__PORT" in r.stderr


def test_flags_parse():
    a = build_parser().parse_args(["serve", "--port", "9000", "--quantization", "nf4", "--dtype", "bfloat16"])
    assert (a.port, a.quantization, a.dtype) == (9000, "nf4", "bfloat16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int3"])

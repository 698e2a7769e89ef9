"""`loraplex train | merge | blend` as commands: exit codes, messages, JSON progress, and --register."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.helpers import ServerProcess

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "server", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "LORAPLEX_MODEL__DTYPE": "float32"})


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"hello world {i}", "completion": " the quick fox"}) + "\n"
                         for i in range(16)))
    return p


def test_blend_writes_a_peft_folder_into_the_store(tiny_model_dir, store_copy):
    r = cli("blend", "alpha=0.6", "beta=0.4", "--name", "mixy", "--type", "cat", "--base", tiny_model_dir,
            "--adapters-dir", store_copy)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((store_copy / "mixy" / "adapter_config.json").read_text())
    assert cfg["r"] == 6  # cat: ranks add up (4 + 2)
    assert json.loads((store_copy / "mixy" / "blend.json").read_text())["adapters"][0] == {"name": "alpha",
                                                                                          "weight": 0.6}
    r = cli("blend", "alpha=1", "beta=1", "--name", "lin", "--base", tiny_model_dir, "--adapters-dir", store_copy)
    assert r.returncode == 1 and "equal rank" in r.stderr and not (store_copy / "lin").exists()
    r = cli("blend", "alpha=1", "--name", "mixy", "--base", tiny_model_dir, "--adapters-dir", store_copy)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_train_reports_bad_data_with_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    r = cli("train", bad, "--name", "x", "--base", tiny_model_dir, "--adapters-dir", tmp_path / "store")
    assert r.returncode == 1
    assert f"{bad}:2: invalid JSON" in r.stderr
    r = cli("train", bad, "--name", "../x", "--base", tiny_model_dir, "--adapters-dir", tmp_path / "store")
    assert r.returncode == 1 and "invalid adapter name" in r.stderr


def test_merge_by_store_name_with_json_progress(tiny_model_dir, store_copy, tmp_path):
    r = cli("merge", "alpha", "--out", tmp_path / "fused", "--base", tiny_model_dir, "--adapters-dir", store_copy,
            "--progress", "json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [e["event"] for e in events][-1] == "done" and events[-1]["card"]["max_abs_logit_diff"] < 1e-4
    r = cli("merge", "alpha", "--out", tmp_path / "fused", "--base", tiny_model_dir, "--adapters-dir", store_copy)
    assert r.returncode == 1 and "already exists" in r.stderr


@pytest.mark.e2e
def test_train_register_hot_loads_into_a_running_server(tiny_model_dir, store_copy, data, tmp_path):
    srv = ServerProcess(["--model", str(tiny_model_dir), "--adapters-dir", str(store_copy)],
                        env={"LORAPLEX_MODEL__CACHE_DIR": str(tmp_path / "cache")}, log_path=tmp_path / "srv.log")
    try:
        srv.wait_ready()
        r = cli("train", data, "--name", "fresh", "--base", tiny_model_dir, "--adapters-dir", store_copy,
                "--rank", "4", "--epochs", "1", "--register", "--server", srv.url)
        assert r.returncode == 0, r.stderr
        assert "registered fresh" in r.stderr
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert "fresh" in ids
        out = httpx.post(srv.url + "/v1/completions", json={"model": "fresh", "prompt": "hello", "max_tokens": 4})
        assert out.status_code == 200 and out.json()["model"] == "fresh"
    finally:
        assert srv.stop() == 0

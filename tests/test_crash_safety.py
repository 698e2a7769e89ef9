"""kill -9 at random moments of an adapter load, a blend save and an export: nothing partial is ever visible
in adapters/ or the exports folder, the state file stays valid, and the next start serves what was registered."""

import json
import random
import shutil
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.e2e

OPS = {
    "load": lambda url, i: httpx.post(url + "/admin/adapters", json={"name": f"new{i}", "path": f"src{i}"},
                                      timeout=30),
    "blend": lambda url, i: httpx.post(url + "/admin/blends", timeout=30, json={
        "name": f"blend{i}", "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}],
        "combination_type": "cat", "save": True}),
    "export": lambda url, i: httpx.post(url + "/admin/exports", json={"adapter": "alpha", "name": f"exp{i}"},
                                        timeout=30),
}


def visible(folder):
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def check_disk(store, exports):
    for folder in visible(store):
        if folder.is_dir():
            assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file(), \
                f"partial adapter folder {folder}: {sorted(p.name for p in folder.iterdir())}"
    for folder in visible(exports):
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "loraplex-export.json"} <= names, f"partial export {folder}"
    state = store / ".loraplex" / "state.json"
    if state.exists():
        json.loads(state.read_text())  # never a torn write


def start(tiny_model_dir, store, exports, tmp_path, n):
    return ServerProcess(["--model", str(tiny_model_dir), "--adapters-dir", str(store)],
                         env={"LORAPLEX_MODEL__CACHE_DIR": str(tmp_path / "cache"),
                              "LORAPLEX_TRAIN__EXPORTS_DIR": str(exports)},
                         log_path=tmp_path / f"server{n}.log").wait_ready()


def models(url):
    return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_kill_9_during_load_blend_and_export(tiny_model_dir, store_copy, tmp_path):
    rng = random.Random(7)
    exports = tmp_path / "exports"
    srv = start(tiny_model_dir, store_copy, exports, tmp_path, 0)
    trial = 0
    for _ in range(3):  # three kills at random moments of each operation
        for op, call in OPS.items():
            trial += 1
            shutil.copytree(store_copy / "alpha", store_copy / f".src{trial}")  # hidden until it is loaded
            (store_copy / f".src{trial}").rename(store_copy / f"src{trial}")
            before = models(srv.url)
            worker = threading.Thread(target=_quiet, args=(call, srv.url, trial), daemon=True)
            worker.start()
            time.sleep(rng.uniform(0.0, 0.4 if op != "export" else 3.0))
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(10)
            worker.join(30)
            time.sleep(0.5)  # an export's child gets SIGTERM when its server dies; let it go
            check_disk(store_copy, exports)
            srv = start(tiny_model_dir, store_copy, exports, tmp_path, trial)
            after = models(srv.url)
            assert before - {f"src{trial}"} <= after, (op, before - after)  # nothing registered was lost
            assert not list(store_copy.glob(".loraplex/.staging-*")) and not list(exports.glob(".staging-*"))
    assert srv.stop() == 0


def _quiet(call, url, i):
    try:
        call(url, i)
    except httpx.HTTPError:
        pass  # the server was killed under it

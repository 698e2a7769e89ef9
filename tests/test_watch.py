"""Store watching: folders added, changed and removed while the server runs are registered,
replaced and unregistered within a few scans, never half-copied (server/watch.py)."""

import shutil
import time

from server.watch import scan

WATCH = {"LORAPLEX_ADAPTERS__WATCH": "true", "LORAPLEX_ADAPTERS__WATCH_INTERVAL_S": "0.05",
         "LORAPLEX_ADAPTERS__RESOLVE_STORE": "false",  # so only the watcher can register a new folder
         "LORAPLEX_SERVER__ADMIN_TOKEN": "adm"}
ADMIN = {"Authorization": "Bearer adm"}


def until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def models(client):
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def text(client, model):
    r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 12})
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None


def version(client, name):
    r = client.get(f"/admin/adapters/{name}", headers=ADMIN)
    return r.json()["version"] if r.status_code == 200 else None


def test_the_watcher_registers_replaces_and_unregisters_store_folders(make_client, store_copy, tiny_store):
    client = make_client(env=WATCH)
    shutil.copytree(tiny_store / "alpha", store_copy / "new-one")
    assert until(lambda: "new-one" in models(client))
    v1 = version(client, "new-one")
    assert v1
    assert text(client, "new-one")[0] == 200
    # Changed in place (another adapter's files copied over it): replaced, a new version.
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(tiny_store / "beta" / f, store_copy / "new-one" / f)
    assert until(lambda: version(client, "new-one") not in (v1, None))
    assert text(client, "new-one")[1].startswith("[new-one~")
    shutil.rmtree(store_copy / "new-one")
    assert until(lambda: "new-one" not in models(client))
    assert text(client, "new-one")[0] == 404
    # Added back: registered again (the unregister had marked it removed on purpose).
    shutil.copytree(tiny_store / "alpha", store_copy / "new-one")
    assert until(lambda: "new-one" in models(client))


def test_a_refused_folder_is_listed_as_failed_and_the_watch_goes_on(make_client, store_copy, tiny_store):
    client = make_client(env=WATCH)
    shutil.copytree(tiny_store / "alpha", store_copy / "broken")
    cfg = store_copy / "broken" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 4', '"r": 4096'))
    def failed():
        return [f["name"] for f in client.get("/admin/adapters", headers=ADMIN).json()["failed"]]
    assert until(lambda: "broken" in failed())
    assert "broken" not in models(client)
    shutil.copytree(tiny_store / "beta", store_copy / "fine")
    assert until(lambda: "fine" in models(client))


def test_a_folder_acts_only_once_two_scans_agree(tmp_path, tiny_store):
    shutil.copytree(tiny_store / "alpha", tmp_path / "a")
    (tmp_path / "half").mkdir()
    shutil.copyfile(tiny_store / "alpha" / "adapter_config.json", tmp_path / "half" / "adapter_config.json")
    (tmp_path / ".hidden").mkdir()
    sig = scan(tmp_path)
    assert set(sig) == {"a"}  # a folder without both files is not an adapter yet
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"x")
    assert scan(tmp_path)["a"] != sig["a"]


def test_without_watch_nothing_is_picked_up(make_client, store_copy, tiny_store):
    client = make_client(env={"LORAPLEX_ADAPTERS__RESOLVE_STORE": "false"})
    shutil.copytree(tiny_store / "alpha", store_copy / "quiet")
    time.sleep(0.3)
    assert "quiet" not in models(client)

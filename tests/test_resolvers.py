"""Resolvers: an unknown adapter name is found in the store, a local tree, an S3 bucket (a moto
server on loopback) or a Hub mirror folder, fetched by staging and rename, validated as any load,
and a name no source has is remembered for a while (server/resolvers.py, versions.resolve_unknown)."""

import os
import shutil
import threading

import pytest

from loadtest.resolver_coldload import mirror
from server.errors import ConfigError
from server.resolvers import FILES, Resolvers, Source, parse_source

ADMIN = {"Authorization": "Bearer adm"}


def ask(client, model):
    return client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 12})


def served(client, model):
    r = ask(client, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"].split("]")[0] + "]"


def test_sources_parse_and_bad_ones_are_config_errors():
    assert parse_source("/srv/loras") == Source("dir", "/srv/loras")
    assert parse_source("dir:rel/tree") == Source("dir", "rel/tree")
    assert parse_source("s3://bucket/a/b/") == Source("s3", "bucket/a/b")
    assert parse_source("hf://org@v1.2") == Source("hf", "org", "v1.2")
    assert parse_source("hf://org") == Source("hf", "org", "main")
    for bad in ("s3://", "hf://org/name", "http://x", ""):
        with pytest.raises(ConfigError):
            parse_source(bad)


def test_a_store_folder_that_appears_after_start_up_is_served_on_first_request(make_client, store_copy, tiny_store):
    client = make_client(env={"LORAPLEX_SERVER__ADMIN_TOKEN": "adm"})
    assert "late" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    shutil.copytree(tiny_store / "alpha", store_copy / "late")
    assert served(client, "late") == "[late]"
    assert "late" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    # A store adapter unregistered on purpose is not brought back by a request.
    assert client.delete("/admin/adapters/beta", headers=ADMIN).status_code == 200
    assert ask(client, "beta").status_code == 404 and (store_copy / "beta").is_dir()
    # Off: a new folder waits for an admin.
    off = make_client(env={"LORAPLEX_ADAPTERS__RESOLVE_STORE": "false"}, store=store_copy)
    shutil.copytree(tiny_store / "alpha", store_copy / "later")
    assert ask(off, "later").status_code == 404


def test_a_local_tree_source_fetches_into_the_store_and_remembers_misses(make_client, store_copy, tiny_store,
                                                                         tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_store / "beta", tree / "remote-one")
    (tree / "remote-one" / "README.md").write_text("not fetched")
    client = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": str(tree), "LORAPLEX_ADAPTERS__NEGATIVE_CACHE_S": "60"})
    assert served(client, "remote-one") == "[remote-one]"
    assert sorted(p.name for p in (store_copy / "remote-one").iterdir()) == sorted(FILES)
    assert not [p for p in (store_copy / ".loraplex").iterdir() if p.name.startswith(".staging")]
    miss = ask(client, "typo")
    assert miss.status_code == 404 and miss.json()["error"]["code"] == "model_not_found"
    shutil.copytree(tiny_store / "alpha", tree / "typo")
    assert ask(client, "typo").status_code == 404  # remembered: the source is not asked again yet
    fresh = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": str(tree), "LORAPLEX_ADAPTERS__NEGATIVE_CACHE_S": "0"},
                        store=store_copy)
    assert served(fresh, "typo") == "[typo]"


def test_a_fetched_adapter_is_validated_as_any_load_and_leaves_nothing_when_refused(make_client, store_copy,
                                                                                  tiny_store, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_store / "alpha", tree / "bad")
    cfg = (tree / "bad" / "adapter_config.json")
    cfg.write_text(cfg.read_text().replace('"r": 4', '"r": 4096'))
    client = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": str(tree)})
    r = ask(client, "bad")
    assert r.status_code == 422, r.text
    assert not (store_copy / "bad").exists()
    shutil.copytree(tiny_store / "alpha", tree / "big")
    small = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": str(tree), "LORAPLEX_ADAPTERS__MAX_DOWNLOAD_BYTES": "64"},
                        store=store_copy)
    r = ask(small, "big")
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_too_large"
    assert not (store_copy / "big").exists()


def test_concurrent_requests_for_one_unknown_name_share_one_fetch(make_client, tiny_store, tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_store / "alpha", tree / "shared")
    calls = []
    real = Resolvers.fetch
    gate = threading.Event()

    def counted(self, name, staging):
        calls.append(name)
        gate.wait(5)
        return real(self, name, staging)
    monkeypatch.setattr(Resolvers, "fetch", counted)
    client = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": str(tree)})

    async def main():
        import httpx
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://t") as c:
            import asyncio
            reqs = [asyncio.create_task(c.post("/v1/completions", json={"model": "shared", "prompt": "hi",
                                                                          "max_tokens": 4})) for _ in range(5)]
            await asyncio.sleep(0.2)
            gate.set()
            return [r.status_code for r in await asyncio.gather(*reqs)]
    assert client.portal.call(main) == [200] * 5
    assert calls == ["shared"]


@pytest.fixture
def s3(tmp_path):
    boto3 = pytest.importorskip("boto3", reason="boto3 is a dev dependency: make test installs it")
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="loras")
    yield client, url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_an_s3_bucket_source_with_checksums(make_client, store_copy, tiny_store, s3):
    client_s3, url = s3
    for f in FILES:  # the bucket computes and keeps each object's sha256
        client_s3.put_object(Bucket="loras", Key=f"team/from-s3/{f}", Body=(tiny_store / "alpha" / f).read_bytes(),
                             ChecksumAlgorithm="SHA256")
        # This one claims a sha256 (user metadata) its bytes do not have.
        client_s3.put_object(Bucket="loras", Key=f"team/tampered/{f}", Body=(tiny_store / "beta" / f).read_bytes(),
                             Metadata={"sha256": "0" * 64})
    env = {"LORAPLEX_ADAPTERS__SOURCES": "s3://loras/team", "LORAPLEX_ADAPTERS__S3_ENDPOINT_URL": url}
    client = make_client(env=env)
    assert served(client, "from-s3") == "[from-s3]"
    assert (store_copy / "from-s3" / FILES[1]).read_bytes() == (tiny_store / "alpha" / FILES[1]).read_bytes()
    r = ask(client, "tampered")
    assert r.status_code == 422 and r.json()["error"]["code"] == "checksum_mismatch"
    assert not (store_copy / "tampered").exists()
    assert ask(client, "absent").status_code == 404


def _hub_mirror(root, repo, folder, revision="main", corrupt=False):
    snap = mirror(root, repo, folder, revision)
    if corrupt:  # the blob's bytes no longer match the sha256 it is named by
        with open((snap / FILES[1]).resolve(), "ab") as f:
            f.write(b"x")


def test_a_hub_mirror_source_never_touches_the_network(make_client, store_copy, tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mirror = tmp_path / "hub"
    _hub_mirror(mirror, "acme/hub-one", tiny_store / "beta", revision="v2")
    _hub_mirror(mirror, "acme/hub-bad", tiny_store / "alpha", revision="v2", corrupt=True)
    client = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": "hf://acme@v2", "LORAPLEX_ADAPTERS__HF_CACHE": str(mirror)})
    assert served(client, "hub-one") == "[hub-one]"
    assert not (store_copy / "hub-one" / FILES[0]).is_symlink()
    r = ask(client, "hub-bad")
    assert r.status_code == 422 and r.json()["error"]["code"] == "checksum_mismatch"
    assert ask(client, "hub-none").status_code == 404
    main_rev = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": "hf://acme", "LORAPLEX_ADAPTERS__HF_CACHE": str(mirror)},
                           store=store_copy)
    assert ask(main_rev, "hub-two").status_code == 404  # no "main" ref in the mirror


def test_scoped_keys_do_not_trigger_a_fetch_outside_their_scope(make_client, store_copy, tiny_store, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_store / "alpha", tree / "other-team")
    client = make_client(env={"LORAPLEX_ADAPTERS__SOURCES": str(tree), "LORAPLEX_SERVER__API_KEYS": "k: mine-*"})
    r = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                    json={"model": "other-team", "prompt": "hi"})
    assert r.status_code == 404 and not (store_copy / "other-team").exists()

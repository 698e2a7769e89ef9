"""/admin/train, /admin/exports and /admin/jobs on an app over the FakeEngine, with real child
processes on the tiny model."""

import json
import time

import pytest

from server.training import defaults

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"hello world {i}"},
                          {"role": "assistant", "content": "the quick brown fox"}]} for i in range(16)]
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    (tmp_path / "secret.jsonl").write_text('{"text": "outside"}\n')
    return d


@pytest.fixture
def jobs_client(make_client, tiny_model_dir, data_dir, tmp_path):
    def make(**env):
        client = make_client(env={"LORAPLEX_MODEL__MODEL": str(tiny_model_dir),
                                  "LORAPLEX_TRAIN__DATA_DIR": str(data_dir),
                                  "LORAPLEX_TRAIN__EXPORTS_DIR": str(tmp_path / "exports"),
                                  "LORAPLEX_SERVER__ADMIN_TOKEN": "adm", **env})
        client.headers["Authorization"] = "Bearer adm"
        return client
    return make


def wait_job(client, job_id, timeout=180.0, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=headers).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


TRAIN = {"name": "trained", "data": "d.jsonl", "rank": 4, "alpha": 8, "epochs": 1, "batch_size": 8,
         "max_seq_len": 64, "learning_rate": 0.01, "eval_fraction": 0.25}


def test_train_job_registers_the_adapter(jobs_client, store_copy):
    client = jobs_client()
    r = client.post("/admin/train", json=TRAIN)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "train" and job["progress"]["step"] == job["progress"]["total"] > 0
    assert "loss" in job["progress"] and "eval_loss" in job["progress"]
    assert job["progress"]["parameters"]["trainable"] > 0
    # The series a page plots: every step's training loss, and the eval losses.
    steps = [p["step"] for p in job["series"] if "loss" in p]
    assert steps == list(range(1, job["progress"]["total"] + 1)) and any("eval_loss" in p for p in job["series"])
    assert job["result"]["adapter"]["name"] == "trained" and job["result"]["card"]["eval_loss"] is not None
    assert "trained" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert (store_copy / "trained" / "training.json").is_file()
    assert [j["id"] for j in client.get("/admin/jobs").json()["data"]] == [job["id"]]
    metrics = client.get("/metrics").text
    assert 'loraplex_jobs_total{kind="train",status="succeeded"} 1.0' in metrics
    # The same name again is a conflict unless replace=true.
    assert client.post("/admin/train", json=TRAIN).status_code == 409


def test_train_job_with_bad_data_fails_naming_the_line(jobs_client, data_dir):
    client = jobs_client()
    r = client.post("/admin/train", json={**TRAIN, "name": "bad", "data": "bad.jsonl"})
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "failed"
    assert f"{data_dir / 'bad.jsonl'}:2: 'text' must be a non-empty string" in job["error"]
    assert 'loraplex_jobs_total{kind="train",status="failed"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("body, status, code", [
    ({"data": "../secret.jsonl"}, 400, "path_outside_roots"),
    ({"data": "/etc/passwd"}, 400, "path_outside_roots"),
    ({"data": "missing.jsonl"}, 400, "data_not_found"),
    ({"data": "a\x00b.jsonl"}, 400, "invalid_path"),
    ({"data": "x" * 5000 + ".jsonl"}, 400, "invalid_path"),
    ({"name": "alpha"}, 409, "name_taken"),
    ({"name": "../up"}, 400, "invalid_name"),
    ({"rank": 512}, 400, "rank_too_large"),
    ({"target_modules": ["q_proj; rm -rf /"]}, 400, None),
    ({"modules_to_save": ["lm_head --replace"]}, 400, None),
    ({"dora": "yes please"}, 400, None),
    ({"epochs": -1}, 400, None),
    ({"surprise": 1}, 400, None),
    ({"promote_if": "eval_loss < __import__('os')"}, 400, "invalid_gate"),
    ({"promote_if": "eval_loss<base", "eval_fraction": 0}, 400, None),
    ({"alias": "../x"}, 400, "invalid_name"),
    ({"alias": "beta"}, 409, "name_is_adapter"),
    ({"alias": "trained"}, 409, "name_is_adapter"),
])
def test_train_requests_are_checked_before_queueing(jobs_client, body, status, code):
    client = jobs_client()
    r = client.post("/admin/train", json={**TRAIN, **body})
    assert r.status_code in ((status, 422) if code is None else (status,)), r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if code:
        assert r.json()["error"]["code"] == code
    assert len(r.json()["error"]["message"]) < 1000  # a long name is shown cut, once
    assert client.get("/admin/jobs").json()["data"] == []


def test_non_finite_numbers_are_refused(jobs_client):
    client = jobs_client()
    r = client.post("/admin/train", content=b'{"name": "n", "data": "d.jsonl", "learning_rate": NaN}',
                    headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_export_job_writes_a_verified_model_folder(jobs_client, tmp_path):
    client = jobs_client()
    assert client.post("/admin/exports", json={"adapter": "nobody", "name": "x"}).status_code == 404
    r = client.post("/admin/exports", json={"adapter": "alpha", "name": "alpha-fused"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    out = tmp_path / "exports" / "alpha-fused"
    assert job["result"]["path"] == str(out) and job["result"]["card"]["max_abs_logit_diff"] < 1e-4
    assert (out / "config.json").is_file() and (out / "loraplex-export.json").is_file()
    assert client.post("/admin/exports", json={"adapter": "alpha", "name": "alpha-fused"}).status_code == 409
    # The export evaluates as the adapter it was fused from.
    r = client.post("/admin/evals", json={"data": "d.jsonl", "adapters": ["alpha"], "exports": ["alpha-fused"],
                                          "max_examples": 3, "exact": False})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    rows = {row["model"]: row for row in job["result"]["results"]}
    assert rows["alpha-fused"]["kind"] == "export" and rows["base"]["loss"] != rows["alpha"]["loss"]
    assert rows["alpha-fused"]["loss"] == pytest.approx(rows["alpha"]["loss"], rel=1e-4)


def test_a_gated_train_job_registers_and_flips_an_alias_only_when_the_gate_holds(jobs_client, store_copy):
    client = jobs_client()
    r = client.post("/admin/train", json={**TRAIN, "name": "gated", "promote_if": "eval_loss<0.01*base",
                                          "alias": "live"})
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["promoted"] is False and "does not hold" in job["result"]["card"]["promotion"]["reason"]
    assert "gated" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert not (store_copy / "gated").exists() and client.get("/admin/aliases/live").status_code == 404
    r = client.post("/admin/train", json={**TRAIN, "name": "gated", "promote_if": "eval_loss<base",
                                          "alias": "live"})
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    version = job["result"]["adapter"]["version"]
    assert job["result"]["promoted"] is True and job["result"]["alias"]["targets"][0]["model"] == f"gated@{version}"
    assert client.get("/admin/aliases/live").json()["targets"][0]["model"] == f"gated@{version}"


def test_eval_jobs(jobs_client, store_copy):
    client = jobs_client()
    r = client.post("/admin/evals", json={"data": "d.jsonl", "adapters": ["alpha", "beta"], "max_examples": 2})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "eval" and [row["model"] for row in job["result"]["results"]] == ["base", "alpha", "beta"]
    assert all(row["scored"] == 2 and row["loss"] > 0 for row in job["result"]["results"])
    assert 'loraplex_jobs_total{kind="eval",status="succeeded"} 1.0' in client.get("/metrics").text
    for body, status in (({"data": "d.jsonl", "held_out": "alpha"}, 400), ({}, 400),
                         ({"data": "../secret.jsonl"}, 400), ({"data": "d.jsonl", "adapters": ["nobody"]}, 404),
                         ({"data": "d.jsonl", "exports": ["nothing"]}, 400),
                         ({"data": "d.jsonl", "base": False}, 400), ({"data": "d.jsonl", "extra": 1}, 400)):
        r = client.post("/admin/evals", json=body)
        assert r.status_code in ((status, 422) if status == 400 else (status,)), (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # held_out: alpha was not trained here (no card); a card naming a file outside the data folder
    # (an adapter's card comes from whoever made it) is refused before anything reads it.
    r = client.post("/admin/evals", json={"held_out": "alpha"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_training_card"
    card = {"data": {"file": "/etc/passwd", "sha256": "x"}, "method": "lora",
            "hyperparameters": {"eval_fraction": 0.1, "seed": 0, "max_seq_len": 64}}
    (store_copy / "beta" / "training.json").write_text(json.dumps(card))
    r = client.post("/admin/evals", json={"held_out": "beta"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_outside_roots"
    card["data"]["file"] = "a\x00b.jsonl"   # a name the OS cannot hold: a 400 too, never a 500
    (store_copy / "beta" / "training.json").write_text(json.dumps(card))
    r = client.post("/admin/evals", json={"held_out": "beta"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"


def test_the_data_folder_is_listed(jobs_client, data_dir):
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "deeper.jsonl").write_text("{}\n")
    (data_dir / "escape.jsonl").symlink_to(data_dir.parent / "secret.jsonl")
    names = [f["name"] for f in jobs_client().get("/admin/data").json()["data"]]
    assert names == ["bad.jsonl", "d.jsonl"]   # not below it, not through a link out of it


def test_unknown_jobs_and_auth(jobs_client):
    client = jobs_client(LORAPLEX_SERVER__API_KEYS="inf")
    del client.headers["Authorization"]
    admin = {"Authorization": "Bearer adm"}
    assert client.get("/admin/jobs/nope", headers=admin).status_code == 404
    assert client.delete("/admin/jobs/nope", headers=admin).status_code == 404
    for headers, status in (({}, 401), ({"Authorization": "Bearer inf"}, 403), ({"Authorization": "Bearer x"}, 401)):
        assert client.post("/admin/train", json=TRAIN, headers=headers).status_code == status
        assert client.get("/admin/jobs", headers=headers).status_code == status


def test_the_variant_flags_reach_the_trainers_command_line(jobs_client):
    """POST /admin/train's variant, QLoRA and gate fields become the CLI flags the job runs."""
    from server.api.jobs import TrainBody, _train_argv
    from server.cli import build_parser

    client = jobs_client()
    state = client.app.state.loraplex
    body = TrainBody(**{**TRAIN, "dora": True, "rslora": True, "modules_to_save": ["lm_head", "norm"], "qlora": True,
                        "loftq": True, "loftq_examples": 0, "promote_if": "eval_loss<0.8*base"})
    args = build_parser().parse_args(_train_argv(state, body, state.config.path("d.jsonl")))
    assert args.dora and args.rslora and args.modules_to_save == "lm_head,norm"
    assert args.qlora and args.loftq and args.loftq_examples == 0 and args.promote_if == "eval_loss<0.8*base"
    plain = build_parser().parse_args(_train_argv(state, TrainBody(**TRAIN), state.config.path("d.jsonl")))
    assert not plain.dora and not plain.rslora and plain.modules_to_save is None
    assert not plain.loftq and plain.promote_if is None
    assert plain.loftq_examples == defaults.LOFTQ_EXAMPLES and plain.warmup_ratio == defaults.WARMUP_RATIO

"""/metrics after real traffic (FakeEngine): counts add up per adapter and outcome, the label stays
bounded, promtool accepts the exposition, and the dashboard only queries metrics that exist."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"authorization": "Bearer t"}


@pytest.fixture
def c(make_client):
    return make_client(env={"LORAPLEX_SERVER__ADMIN_TOKEN": "t"})


def samples(c) -> dict[tuple, float]:
    text = c.get("/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap, name, **labels):
    """The sum over the series whose labels include these (a PromQL selector's meaning)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= set(ls))


def traffic(c):
    sent = {("fake-model", "stop"): 0, ("fake-model", "length"): 0, ("alpha", "stop"): 0, ("beta", "length"): 0,
            ("alpha", "rejected"): 0}
    for _ in range(3):
        r = c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 50})
        assert r.status_code == 200
        sent["fake-model", "stop"] += 1
    assert c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 2}).status_code == 200
    sent["fake-model", "length"] += 1
    for _ in range(2):
        r = c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        sent["alpha", "stop"] += 1
    with c.stream("POST", "/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 5, "stream": True,
                                                   "n": 2}) as r:
        list(r.iter_lines())
    sent["beta", "length"] += 1
    assert c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": -3}).status_code == 400
    # a validation error is refused before the model is resolved: not counted. This one is, after:
    assert c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 10000}).status_code == 400
    sent["alpha", "rejected"] += 1
    return sent


def test_counts_add_up(c):
    sent = traffic(c)
    snap = samples(c)
    for (adapter, outcome), n in sent.items():
        assert value(snap, "loraplex_requests_total", adapter=adapter, outcome=outcome) == n, (adapter, outcome)
    total = sum(v for (name, _), v in snap.items() if name == "loraplex_requests_total")
    assert total == sum(sent.values())
    # tokens: beta streamed 2 choices x 5 tokens; base: 3 x (len("[base] hi") + EOS) + 2
    assert value(snap, "loraplex_generation_tokens_total", adapter="beta") == 10
    assert value(snap, "loraplex_generation_tokens_total", adapter="fake-model") == 3 * 10 + 2
    assert value(snap, "loraplex_prompt_tokens_total", adapter="fake-model") == 4 * 2
    assert value(snap, "loraplex_time_to_first_token_seconds_count", adapter="alpha") == 2
    assert value(snap, "loraplex_request_duration_seconds_count", adapter="beta") == 1
    assert value(snap, "loraplex_inter_token_latency_seconds_count", adapter="beta") == 2 * 4
    assert value(snap, "loraplex_adapters_registered") == 2
    assert value(snap, "loraplex_adapter_loads_total", result="ok") == 2
    assert value(snap, "loraplex_process_resident_memory_bytes") > 0


def test_unknown_models_make_no_series(c):
    traffic(c)
    before = set(samples(c))
    for i in range(50):
        assert c.post("/v1/completions", json={"model": f"nope-{i}", "prompt": "x"}).status_code == 404
    after = samples(c)
    assert set(after) == before
    assert not any("nope" in str(k) for k in after)


def test_unregistered_adapter_series_go_away(c):
    traffic(c)
    assert any(dict(k[1]).get("adapter") == "beta" for k in samples(c))
    assert c.delete("/admin/adapters/beta", headers=ADMIN).status_code == 200
    assert not any(dict(k[1]).get("adapter") == "beta" for k in samples(c))
    assert any(dict(k[1]).get("adapter") == "alpha" for k in samples(c))


def test_request_id_echoed_and_logged(c, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="loraplex.request")
    r = c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 3},
               headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(c.get("/health").headers["x-request-id"]) == 32          # made up when not given
    assert c.get("/health", headers={"x-request-id": "bad id\n"}).headers["x-request-id"] != "bad id\n"
    [rec] = [r for r in caplog.records if r.name == "loraplex.request"]
    f = rec.fields
    assert (f["request_id"], f["adapter"], f["outcome"], f["prompt_tokens"], f["completion_tokens"]) == \
        ("abc-123", "alpha", "length", 1, 3)
    assert f["ttft_ms"] is not None and f["total_ms"] >= f["ttft_ms"]


def test_json_log_format():
    import logging

    from server.logs import JsonFormatter
    rec = logging.LogRecord("loraplex.request", logging.INFO, __file__, 1, "request", None, None)
    rec.fields = {"request_id": "r1", "adapter": "a"}
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["message"] == "request" and obj["request_id"] == "r1" and obj["level"] == "info"


def test_promtool_accepts_the_exposition(c, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    traffic(c)
    r = subprocess.run([promtool, "check", "metrics"], input=c.get("/metrics").text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_only_existing_metrics(c):
    traffic(c)
    exposed = {fam.name for fam in text_string_to_metric_families(c.get("/metrics").text)}
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "loraplex.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"loraplex_[a-z_]+", e)}
    # GPU memory is exposed only where there is a GPU (an always-0 series on CPU would mislead).
    gpu_only = {"loraplex_gpu_memory_allocated_bytes"}
    assert gpu_only <= set(c.app.state.loraplex.metrics._state)
    missing = used - exposed - gpu_only
    assert not missing, missing
    assert any("histogram_quantile" in e for e in exprs)


def test_deploy_files_are_consistent():
    import yaml
    r = subprocess.run([shutil.which("promtool"), "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (ROOT / "deploy" / host).exists(), host
    for sub in ("datasources", "dashboards"):
        for f in (ROOT / "deploy" / "grafana" / "provisioning" / sub).glob("*.yml"):
            assert yaml.safe_load(f.read_text())["apiVersion"] == 1


def test_router_gauges_say_where_each_adapter_is_and_what_runs(c):
    """Issue 14: loraplex_adapter_resident per adapter and tier, and vLLM's lora_requests_info in its
    label format (what the Gateway API Inference Extension's endpoint picker reads)."""
    import time

    traffic(c)
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    resident = {(s.labels["adapter"], s.labels["tier"]): s.value for s in fams["loraplex_adapter_resident"].samples}
    listed = {a["name"]: a["loaded"] for a in c.get("/admin/adapters", headers=ADMIN).json()["data"]}
    assert resident == {(n, "memory" if loaded else "disk"): 1.0 for n, loaded in listed.items()}
    [info] = fams["loraplex_lora_requests_info"].samples
    assert info.labels["max_lora"] == str(c.app.state.loraplex.registry.capacity)
    assert info.labels["running_lora_adapters"] == "" and info.labels["waiting_lora_adapters"] == ""
    assert abs(info.value - time.time()) < 60
    assert c.delete("/admin/adapters/beta", headers=ADMIN).status_code == 200
    after = {s.labels["adapter"] for f in text_string_to_metric_families(c.get("/metrics").text)
             if f.name == "loraplex_adapter_resident" for s in f.samples}
    assert "beta" not in after and "alpha" in after


def test_the_inference_pool_example_agrees_with_itself_and_the_metrics(c):
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "inferencepool.yaml").read_text()))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    pool = by["InferencePool", "loraplex"]["spec"]
    server = by["Deployment", "loraplex"]["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= server["metadata"]["labels"].items()
    assert {p["number"] for p in pool["targetPorts"]} == {p["containerPort"] for p in server["spec"]["containers"][0]
                                                          ["ports"]}
    epp = by["Deployment", pool["endpointPickerRef"]["name"]]["spec"]["template"]["spec"]["containers"][0]
    assert pool["endpointPickerRef"]["port"]["number"] in {p["containerPort"] for p in epp["ports"]}
    assert by["Service", pool["endpointPickerRef"]["name"]]["spec"]["ports"][0]["port"] == 9002
    named = dict(a.removeprefix("--").split("=", 1) for a in epp["args"] if "=" in a)
    assert named["pool-name"] == "loraplex"
    exposed = {f.name for f in text_string_to_metric_families(c.get("/metrics").text)}
    metrics = [v for k, v in named.items() if k.endswith("-metric")]
    assert len(metrics) == 4 and set(metrics) <= exposed

"""Versions and aliases through the API (FakeEngine): NAME@VERSION, alias flips and rollback, kept
versions, canary splits, restarts, and that no request ever sees two versions while aliases flip.

The fake's reply starts with the engine name of what served it: "[alpha]" for alpha's first
version, "[alpha~1]" for its first replacement (server/engine/fake.py's script)."""

import asyncio
import collections
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.aliases import Alias, parse_targets
from server.errors import InvalidRequest
from tests.conftest import wait_ready

ADMIN = {"Authorization": "Bearer adm"}
ENV = {"LORAPLEX_SERVER__ADMIN_TOKEN": "adm"}


def served(client, model, user=None):
    body = {"model": model, "prompt": "hi", "max_tokens": 12, **({"user": user} if user else {})}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"].split("]")[0] + "]"


def version(client, name):
    r = client.get(f"/admin/adapters/{name}", headers=ADMIN)
    assert r.status_code == 200
    return r.json()["version"]


def put_alias(client, alias, **body):
    return client.put(f"/admin/aliases/{alias}", headers=ADMIN, json=body)


def replace_alpha_with_betas_files(client):
    r = client.post("/admin/adapters", headers=ADMIN, json={"name": "alpha", "path": "beta", "replace": True})
    assert r.status_code == 201, r.text


def test_a_version_is_the_sha256_prefix_and_name_at_version_serves_it(make_client):
    client = make_client(env=ENV)
    entry = client.get("/admin/adapters/alpha", headers=ADMIN).json()
    assert entry["version"] == entry["sha256"][:12] and len(entry["version"]) == 12
    v1 = entry["version"]
    assert served(client, f"alpha@{v1}") == "[alpha]"
    r = client.post("/v1/completions", json={"model": "alpha@000000000000", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    replace_alpha_with_betas_files(client)
    assert version(client, "alpha") != v1
    # Nobody holds v1 (no alias names it): the replaced version is gone for new requests.
    assert client.post("/v1/completions", json={"model": f"alpha@{v1}", "prompt": "hi"}).status_code == 404
    assert served(client, f"alpha@{version(client, 'alpha')}") == "[alpha~1]"


def test_an_alias_flips_keeps_what_it_names_and_rolls_back(make_client):
    client = make_client(env=ENV)
    v1 = version(client, "alpha")
    r = put_alias(client, "prod", target=f"alpha@{v1}")
    assert r.status_code == 201, r.text
    assert r.json()["targets"] == [{"model": f"alpha@{v1}", "weight": 1.0, "version": v1}]
    assert put_alias(client, "prod", target=f"alpha@{v1}").status_code == 200  # the same: no change
    assert served(client, "prod") == "[alpha]"
    replace_alpha_with_betas_files(client)
    v2 = version(client, "alpha")
    # prod pins v1: it keeps serving v1, kept in memory and reachable as alpha@v1.
    assert served(client, "prod") == "[alpha]" and served(client, f"alpha@{v1}") == "[alpha]"
    assert served(client, "alpha") == "[alpha~1]"
    assert "alpha" in client.engine.adapters
    r = put_alias(client, "prod", target="alpha")  # follows the current version
    assert r.status_code == 200 and r.json()["previous"] == [{"model": f"alpha@{v1}", "weight": 1.0}]
    assert served(client, "prod") == "[alpha~1]"
    assert served(client, f"alpha@{v1}") == "[alpha]"  # still kept: it is the rollback target
    r = client.post("/admin/aliases/prod/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["targets"][0]["model"] == f"alpha@{v1}"
    assert served(client, "prod") == "[alpha]"
    # Two flips away from v1: nothing names it any more; it is unloaded once idle.
    assert put_alias(client, "prod", target="alpha").status_code == 200
    assert put_alias(client, "prod", target=f"alpha@{v2}").status_code == 200
    assert client.post("/v1/completions", json={"model": f"alpha@{v1}", "prompt": "hi"}).status_code == 404
    deadline = time.monotonic() + 5
    while "alpha" in client.engine.adapters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "alpha" not in client.engine.adapters and "alpha~1" in client.engine.adapters
    listed = client.get("/admin/aliases", headers=ADMIN).json()["data"]
    assert [a["alias"] for a in listed] == ["prod"]
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["fake-model", "alpha", "beta", "prod"]
    assert models[-1]["root"] == f"alpha@{v2}"
    assert client.get("/v1/models/prod").json()["id"] == "prod"
    assert client.delete("/admin/aliases/prod", headers=ADMIN).status_code == 200
    assert client.post("/v1/completions", json={"model": "prod", "prompt": "hi"}).status_code == 404


@pytest.mark.parametrize("body, status, code", [
    ({"target": "alpha", "targets": [{"model": "alpha", "weight": 1}]}, 400, None),
    ({}, 400, None),
    ({"targets": [{"model": "alpha", "weight": -1}]}, 400, None),
    ({"targets": [{"model": "alpha", "weight": True}]}, 400, None),
    ({"targets": [{"model": "alpha", "weight": 1}, {"model": "alpha", "weight": 1}]}, 400, None),
    ({"targets": [{"model": "alpha", "weight": 1, "extra": 1}]}, 400, None),
    ({"target": "ghost"}, 404, "model_not_found"),
    ({"target": "alpha@0123456789ab"}, 404, "version_not_found"),
])
def test_bad_alias_bodies_are_refused_and_change_nothing(make_client, body, status, code):
    client = make_client(env=ENV)
    r = put_alias(client, "prod", **body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if code:
        assert r.json()["error"]["code"] == code
    assert client.get("/admin/aliases", headers=ADMIN).json()["data"] == []


def test_alias_names_never_clash_with_adapters_and_targets_cannot_be_unloaded(make_client):
    client = make_client(env=ENV)
    r = put_alias(client, "alpha", target="beta")
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_is_adapter"
    assert put_alias(client, "fake-model", target="beta").json()["error"]["code"] == "name_is_base"
    assert put_alias(client, "prod", target="beta").status_code == 201
    r = client.post("/admin/adapters", headers=ADMIN, json={"name": "prod", "path": "alpha"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_is_alias"
    r = client.post("/admin/blends", headers=ADMIN, json={"name": "prod", "adapters": [{"name": "alpha", "weight": 1}]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_is_alias"
    r = client.delete("/admin/adapters/beta", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use_by_alias"
    assert served(client, "prod") == "[beta]"
    assert client.post("/admin/aliases/prod/rollback", headers=ADMIN).json()["error"]["code"] == "no_previous_target"
    assert client.post("/admin/aliases/nope/rollback", headers=ADMIN).status_code == 404


def test_aliases_and_kept_versions_survive_a_restart(make_client, store_copy):
    client = make_client(env=ENV)
    v1 = version(client, "alpha")
    assert put_alias(client, "prod", target=f"alpha@{v1}").status_code == 201
    assert put_alias(client, "canary", targets=[{"model": f"alpha@{v1}", "weight": 3},
                                                {"model": "beta", "weight": 1}]).status_code == 201
    replace_alpha_with_betas_files(client)
    again = make_client(env=ENV, store=store_copy)
    wait_ready(again)
    assert served(again, "prod").startswith("[alpha~") and served(again, f"alpha@{v1}") == served(again, "prod")
    assert served(again, "alpha") != served(again, "prod")
    canary = again.get("/admin/aliases/canary", headers=ADMIN).json()
    assert canary["targets"] == [{"model": f"alpha@{v1}", "weight": 0.75, "version": v1},
                                 {"model": "beta", "weight": 0.25, "version": version(again, "beta")}]


def test_a_canary_split_is_within_tolerance_and_reproducible_per_user(make_client):
    client = make_client(env=ENV)
    assert put_alias(client, "chat", targets=[{"model": "alpha", "weight": 0.9},
                                              {"model": "beta", "weight": 0.1}]).status_code == 201
    counts = collections.Counter(served(client, "chat", user=f"user-{i}") for i in range(1000))
    # Binomial(1000, 0.1): sd 9.5, so 100 +- 40 is over 4 sd.
    assert set(counts) == {"[alpha]", "[beta]"} and 60 <= counts["[beta]"] <= 140, counts
    # The metrics carry the version that served, for a dashboard to compare the two sides.
    served_by = collections.Counter()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "loraplex_requests_total":
                served_by[(sample.labels["adapter"], sample.labels["version"])] += sample.value
    assert served_by == {("alpha", version(client, "alpha")): counts["[alpha]"],
                         ("beta", version(client, "beta")): counts["[beta]"]}
    # The same user always lands on the same side; without a user the request id decides.
    assert len({served(client, "chat", user="user-7") for _ in range(5)}) == 1
    assert len({served(client, "chat") for _ in range(200)}) == 2  # all 200 on one side: p = 0.9^200


def test_no_request_ever_sees_two_versions_while_aliases_flip_under_traffic(make_client):
    """Requests run while the alias flips between a kept old version, the current one and another
    adapter; every reply comes from one version (its tokens carry one engine name), and every
    request started after a flip returned uses the new target. All on the app's own event loop."""
    client = make_client(env=ENV, token_delay=0.001)
    v1 = version(client, "alpha")
    assert put_alias(client, "prod", target=f"alpha@{v1}").status_code == 201
    assert put_alias(client, "keep-v1", target=f"alpha@{v1}").status_code == 201  # v1 stays while prod flips
    replace_alpha_with_betas_files(client)
    targets = [f"alpha@{v1}", "alpha", "beta"]
    expect = {f"alpha@{v1}": "[alpha]", "alpha": "[alpha~1]", "beta": "[beta]"}

    async def main():
        flips = [f"alpha@{v1}"]  # flips[n]: the target after the n-th flip
        done = False
        seen: list[tuple[int, int, str]] = []  # (flips when it started, flips when it ended, text)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://t",
                                     headers=ADMIN) as c:
            async def traffic():
                while not done:
                    start = len(flips) - 1
                    r = await c.post("/v1/completions", json={"model": "prod", "prompt": "hi", "max_tokens": 24})
                    assert r.status_code == 200, r.text
                    seen.append((start, len(flips) - 1, r.json()["choices"][0]["text"]))

            tasks = [asyncio.create_task(traffic()) for _ in range(6)]
            try:
                for i in range(30):
                    await asyncio.sleep(0.01)
                    new = targets[(i + 1) % 3]
                    assert (await c.put("/admin/aliases/prod", json={"target": new})).status_code == 200
                    flips.append(new)
                    r = await c.post("/v1/completions", json={"model": "prod", "prompt": "hi", "max_tokens": 12})
                    assert r.json()["choices"][0]["text"].startswith(expect[new])
            finally:
                done = True
                await asyncio.gather(*tasks)
        return flips, seen

    flips, seen = client.portal.call(main)
    assert len(seen) >= 30 and any(start != end for start, end, _ in seen)  # requests ran across flips
    for start, end, text in seen:
        heads = [h for h in expect.values() if h in text]
        assert len(heads) == 1, text   # one version's tokens only
        # It got the target in force when it started, or one a flip made while it was on its way
        # to the lookup; never one from before it started.
        assert heads[0] in {expect[t] for t in flips[start:end + 1]}, (start, end, text)
    assert {next(h for h in expect.values() if h in text) for _, _, text in seen} == set(expect.values())


def test_alias_choice_and_body_parsing_units():
    a = Alias((("a", 0.5), ("b", 0.5)))
    picks = [a.pick("x", f"s{i}") for i in range(400)]
    assert picks == [a.pick("x", f"s{i}") for i in range(400)]   # reproducible
    assert 150 < picks.count("a") < 250
    assert Alias((("only", 1.0),)).pick("x", "anything") == "only"
    assert parse_targets({"targets": [{"model": "a", "weight": 3}, {"model": "b", "weight": 1}]}) == \
        (("a", 0.75), ("b", 0.25))
    with pytest.raises(InvalidRequest):
        parse_targets({"targets": [{"model": "a", "weight": float("inf")}]})
    assert Alias.from_json(a.to_json()) == a

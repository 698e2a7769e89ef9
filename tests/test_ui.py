"""The web console (/ui) in headless Chromium (Debian's package) driven by Playwright, against a real
`loraplex serve` on the tiny test model. Each view's screenshot is written to `screenshots/` (git-ignored)."""

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "screenshots"
CHROMIUM = os.environ.get("LORAPLEX_CHROMIUM", "/usr/bin/chromium")
ADMIN = "adm-token"
KEY = "inf-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    shutil.copytree(tiny_store, tmp / "store")
    (tmp / "data").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "the fox"}]}
            for i in range(16)]
    (tmp / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    srv = ServerProcess(["--model", str(tiny_model_dir), "--adapters-dir", str(tmp / "store")],
                        env={"LORAPLEX_MODEL__CACHE_DIR": str(tmp / "cache"), "LORAPLEX_MODEL__DTYPE": "float32",
                             "LORAPLEX_TRAIN__DATA_DIR": str(tmp / "data"), "LORAPLEX_SERVER__ADMIN_TOKEN": ADMIN,
                             "LORAPLEX_SERVER__API_KEYS": KEY},
                        log_path=tmp / "server.log")
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: `make test` installs Debian's chromium package"
    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    pg = context.new_page()
    external = []
    pg.on("request", lambda r: external.append(r.url) if not r.url.startswith(server.url) else None)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/ui")
    pg.wait_for_selector("body[data-ready=true]")
    yield pg
    assert external == [], f"the console made external requests: {external}"
    assert errors == [], errors
    context.close()


def sign_in(page, key=KEY, token=ADMIN):
    page.fill("#api-key", key)
    page.fill("#admin-token", token)
    page.click("#auth button[type=submit]")
    page.wait_for_selector("#auth-state:has-text('using these credentials')")


def test_the_page_is_served_with_a_strict_policy_and_can_be_turned_off(server):
    r = httpx.get(server.url + "/ui")
    assert r.status_code == 200 and "<title>loraplex console</title>" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/ui/js/app.js").headers["content-type"].startswith("text/javascript")
    for bad in ("/ui/../server/app.py", "/ui/%2e%2e/config.py", "/ui/js/nope.js", "/ui/index.html/x"):
        assert httpx.get(server.url + bad).status_code == 404, bad


def test_compare_streams_two_adapters_side_by_side(page):
    sign_in(page)
    inputs = page.locator(".column-model")
    inputs.nth(0).fill("alpha")
    inputs.nth(1).fill("beta")
    page.fill("#compare-max-tokens", "12")
    page.click("#compare-run")
    page.wait_for_selector("#compare-output article[data-model=alpha][data-done=true]")
    page.wait_for_selector("#compare-output article[data-model=beta][data-done=true]")
    texts = [page.inner_text(f"#compare-output article[data-model={m}] pre") for m in ("alpha", "beta")]
    assert all(texts) and texts[0] != texts[1]
    stats = page.inner_text("#compare-output article[data-model=alpha] .stats:nth-of-type(2)")
    assert "12 tokens" in stats and "TTFT" in stats and "tok/s" in stats
    assert re.search(r"version [0-9a-f]{12}", page.inner_text("#compare-output article[data-model=alpha]"))
    assert "outputs part after" in page.inner_text("#compare-status")
    page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)


def test_a_blend_made_with_the_sliders_appears_in_models(page, server):
    sign_in(page)
    page.click("#tab-blend")
    page.wait_for_selector(".slider-row[data-name=alpha]")
    for name, weight in (("alpha", "0.7"), ("beta", "0.3")):
        row = page.locator(f".slider-row[data-name={name}]")
        row.locator("input[type=checkbox]").check()
        row.locator("input[type=range]").fill(weight)
    page.click("#blend-try")
    page.wait_for_selector("#blend-status:has-text('done')")
    assert page.inner_text("#blend-output")
    page.select_option("#blend-type", "cat")
    page.fill("#blend-name", "ui-mix")
    page.click("#blend-save")
    page.wait_for_selector("#blend-status:has-text('saved ui-mix')")
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
           .json()["data"]]
    assert "ui-mix" in ids
    page.screenshot(path=str(SHOTS / "blend.png"), full_page=True)


def test_load_unload_and_pin_from_the_table(page, server):
    sign_in(page)
    page.click("#tab-adapters")
    page.wait_for_selector("#adapters-table tr[data-name=alpha]")
    page.fill("#load-name", "alpha-2")
    page.fill("#load-path", "alpha")
    page.click("#load-form button[type=submit]")
    page.wait_for_selector("#adapters-table tr[data-name=alpha-2]")
    page.click("#adapters-table tr[data-name=alpha-2] button:has-text('Pin')")
    page.wait_for_selector("#adapters-table tr[data-name=alpha-2] button:has-text('Unpin')")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.get(server.url + "/admin/adapters/alpha-2", headers=admin).json()["pinned"] is True
    page.screenshot(path=str(SHOTS / "adapters.png"), full_page=True)
    page.click("#adapters-table tr[data-name=alpha-2] button:has-text('Unpin')")
    page.wait_for_selector("#adapters-table tr[data-name=alpha-2] button:has-text('Pin')")
    page.click("#adapters-table tr[data-name=alpha-2] button:has-text('Unload')")
    page.wait_for_selector("#adapters-table tr[data-name=alpha-2]", state="detached")
    assert httpx.get(server.url + "/admin/adapters/alpha-2", headers=admin).status_code == 404


def test_a_training_job_started_from_the_page_finishes_with_a_curve(page, server):
    sign_in(page)
    page.click("#tab-train")
    page.wait_for_selector("#data-files option[value='d.jsonl']", state="attached")  # the data folder, offered
    page.fill("#train-name", "ui-trained")
    page.fill("#train-data", "d.jsonl")
    page.fill("#train-epochs", "1")
    page.fill("#train-rank", "4")
    page.fill("#train-batch", "4")
    page.click("#train-form button[type=submit]")
    page.wait_for_selector("#train-status[data-job=succeeded]", timeout=240_000)
    assert int(page.get_attribute("#train-chart", "data-points")) >= 3
    assert page.locator("#train-chart polyline[data-series='training loss']").count() == 1
    page.click("#train-card-box summary")
    assert '"name": "ui-trained"' in page.inner_text("#train-card")
    page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
    page.fill("#eval-data", "d.jsonl")
    page.fill("#eval-adapters", "ui-trained")
    page.fill("#eval-max", "2")
    page.click("#eval-form button[type=submit]")
    page.wait_for_selector("#eval-table tr[data-model=ui-trained]", timeout=240_000)
    assert page.locator("#eval-table tr[data-model=base]").count() == 1


def test_live_charts_fill_from_metrics(page, server):
    sign_in(page)
    page.click("#tab-live")
    httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": "alpha", "prompt": "hi", "max_tokens": 8}, timeout=60)
    page.wait_for_selector("#live-status:has-text('adapters seen')", timeout=20_000)
    httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": "alpha", "prompt": "hi", "max_tokens": 8}, timeout=60)
    page.wait_for_function("Number(document.querySelector('#live-throughput').dataset.points) >= 2",
                           timeout=20_000)
    page.screenshot(path=str(SHOTS / "live.png"), full_page=True)


def test_without_a_token_the_admin_views_say_so_and_do_nothing(page, server):
    sign_in(page, token="")
    for tab, view in (("#tab-adapters", "#view-adapters"), ("#tab-blend", "#view-blend"),
                      ("#tab-train", "#view-train")):
        page.click(tab)
        page.wait_for_selector(f"{view} .needs-admin", state="visible")
    assert page.locator("#train-form button[type=submit]").is_disabled()
    assert page.locator("#load-form button[type=submit]").is_disabled()
    assert page.locator("#adapters-table tbody tr").count() == 0
    # Even a form submitted past the disabled button starts nothing: the server refuses the call.
    page.fill("#train-name", "should-not-start")
    page.evaluate("document.querySelector('#train-form').requestSubmit()")
    page.wait_for_selector("#train-status.error")
    page.screenshot(path=str(SHOTS / "no-token.png"), full_page=True)
    jobs = httpx.get(server.url + "/admin/jobs", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert all(j["params"]["name"] != "should-not-start" for j in jobs if j["kind"] == "train")


def test_keyboard_moves_between_tabs(page):
    page.focus("#tab-compare")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#tab-blend", "aria-selected") == "true"
    assert page.evaluate("document.activeElement.id") == "tab-blend"
    page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#tab-compare", "aria-selected") == "true"
    assert page.locator("label:has(#compare-prompt)").count() == 1   # inputs carry labels

"""/ui: the console's files from an allow-list, with a same-origin policy; server.ui = false removes them."""

from server.api.ui import assets


def test_the_console_files_and_nothing_else(make_client):
    client = make_client()
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for rel in ("js/app.js", "js/api.js", "style.css"):
        assert client.get(f"/ui/{rel}").status_code == 200, rel
    # Every script the page loads is one that ships, and no file names another host.
    assert {"index.html", "style.css", "js/app.js", "js/compare.js", "js/live.js"} <= set(assets())
    for rel, path in assets().items():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, rel
    for bad in ("/ui/../server/app.py", "/ui/..%2Fconfig.toml", "/ui/js/nope.js", "/ui/README.md", "/ui/"):
        r = client.get(bad)
        assert r.status_code == 404 and "error" in r.json(), bad


def test_server_ui_false_leaves_the_routes_out(make_client):
    client = make_client(env={"LORAPLEX_SERVER__UI": "false"})
    assert client.get("/ui").status_code == 404
    assert client.get("/ui/js/app.js").status_code == 404
    assert client.get("/health").status_code == 200

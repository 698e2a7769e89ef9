"""Config layering (file < environment < flags), validation messages, secrets from files."""

from pathlib import Path

import pytest

from server.config import load_config
from server.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_file():
    cfg = load_config()
    assert (cfg.server.host, cfg.server.port, cfg.model.model, cfg.adapters.dir) == ("127.0.0.1", 8000, "default",
                                                                                      "adapters")


def test_repo_config_toml_is_valid_and_matches_defaults():
    cfg = load_config(ROOT / "config.toml")
    default = load_config()
    for section in ("server", "model", "engine", "adapters"):
        assert getattr(cfg, section) == getattr(default, section), section
    assert cfg.base_dir == ROOT


def test_every_key_in_config_toml_is_documented():
    lines = (ROOT / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#") or "=" in lines[i - 1], f"undocumented: {line}"


def test_layering_file_env_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[engine]\nmax_batch_size = 4\n')
    cfg = load_config(f, environ={"LORAPLEX_SERVER__PORT": "9100", "LORAPLEX_ENGINE__MAX_BATCH_SIZE": "8",
                                  "OTHER": "x"},
                      overrides={"server.port": 9200, "model.dtype": None})
    assert cfg.server.port == 9200          # flag beats environment
    assert cfg.engine.max_batch_size == 8   # environment beats file
    assert cfg.server.host == "0.0.0.0"     # file beats default
    assert cfg.model.dtype == "auto"        # a None flag is no override


def test_relative_paths_follow_the_config_file(tmp_path):
    f = tmp_path / "sub" / "c.toml"
    f.parent.mkdir()
    f.write_text('[adapters]\ndir = "store"\n')
    cfg = load_config(f)
    assert cfg.path(cfg.adapters.dir) == tmp_path / "sub" / "store"


@pytest.mark.parametrize("text,env,needle", [
    ("[server]\nport = 'x'\n", {}, "server.port"),
    ("[server]\nport = 70000\n", {}, "server.port"),
    ("[model]\ndtype = 'float64'\n", {}, "model.dtype"),
    ("[nope]\na = 1\n", {}, "[nope]"),
    ("[server]\nbogus = 1\n", {}, "server.bogus"),
    ("not toml [", {}, "invalid TOML"),
    ("", {"LORAPLEX_ENGINE__MAX_BATCH_SIZE": "0"}, "engine.max_batch_size"),
    ("", {"LORAPLEX_ADAPTERS__LOAD_AT_STARTUP": "perhaps"}, "adapters.load_at_startup"),
    ("", {"LORAPLEX_MODEL__QUANTIZATION": "int3"}, "model.quantization"),
    # the pydantic sections (issue 18): a boolean is not a port, NaN is not a timeout, a TOML
    # number is not a string, and a check across keys names where the values came from
    ("[server]\nport = true\n", {}, "server.port"),
    ("", {"LORAPLEX_SERVER__REQUEST_TIMEOUT_S": "nan"}, "server.request_timeout_s"),
    ("[model]\nid = 5\n", {}, "model.id"),
    ("", {"LORAPLEX_ENGINE__MAX_NUM_BATCHED_TOKENS": "8"}, "environment LORAPLEX_ENGINE__MAX_NUM_BATCHED_TOKENS"),
])
def test_errors_name_the_key(tmp_path, text, env, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, environ=env)
    assert needle in str(e.value)


def test_secrets_from_env_and_files(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n\nk2\n")
    token = tmp_path / "token"
    token.write_text("admin-secret\n")
    cfg = load_config(environ={"LORAPLEX_SERVER__API_KEYS": "k0", "LORAPLEX_SERVER__API_KEYS_FILE": str(keys),
                               "LORAPLEX_SERVER__ADMIN_TOKEN_FILE": str(token)})
    assert cfg.api_keys() == ["k0", "k1", "k2"]
    assert cfg.admin_token() == "admin-secret"
    cfg = load_config(environ={"LORAPLEX_SERVER__API_KEYS_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="api_keys_file"):
        cfg.api_keys()


def test_docstrings_cite_only_files_in_the_repository():
    """Issue 18: every `*.md` or `server/...py` path a module's text names exists in the repository."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = []
    for py in sorted((root / "server").rglob("*.py")):
        for ref in re.findall(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.(?:md|py|sh|toml|jinja))\b", py.read_text()):
            here = [root / ref, py.parent / ref, root / "server" / ref]
            if "/" in ref or ref.endswith(".md"):
                if not any(p.exists() for p in here):
                    missing.append(f"{py.relative_to(root)}: {ref}")
    assert not missing, missing

"""Scoped API keys: parsing `KEY: PATTERN ...` entries and matching names."""

import pytest

from server.config import load_config
from server.errors import ConfigError
from server.scopes import Scope, parse_key


def test_parse_key_forms():
    assert parse_key("plain", "w") == ("plain", None)
    assert parse_key(" k3 : support-*  billing", "w") == ("k3", Scope(("support-*", "billing")))
    assert parse_key("k:a\tb", "w") == ("k", Scope(("a", "b")))


@pytest.mark.parametrize("entry", [": a", "k:", "k:   ", "k: a;b", "k: $(x)", "k: a, b", "support-*"])
def test_bad_entries_are_config_errors_that_do_not_echo_the_key(entry):
    with pytest.raises(ConfigError) as e:
        parse_key(entry, "server.api_keys")
    assert "server.api_keys" in str(e.value)
    if entry.startswith("k"):
        assert "'k'" not in str(e.value)


def test_scope_globs_are_case_sensitive_and_whole_name():
    s = Scope(("support-*", "exact", "t?"))
    assert s.allows("support-en") and s.allows("support-") and s.allows("exact") and s.allows("t1")
    assert not s.allows("Support-en") and not s.allows("exactly") and not s.allows("xsupport-a")
    assert not s.allows("t12")


def test_config_reads_scopes_from_toml_env_and_the_keys_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("file-key: f-*\nplain-file-key\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[server]\napi_keys = ["t1: a-* b", "t2"]\napi_keys_file = "{keys}"\n')
    cfg = load_config(toml, environ={})
    scopes = cfg.api_key_scopes()
    assert scopes == {"t1": Scope(("a-*", "b")), "t2": None, "file-key": Scope(("f-*",)), "plain-file-key": None}
    assert cfg.api_keys() == ["t1", "t2", "file-key", "plain-file-key"]
    env = load_config(environ={"LORAPLEX_SERVER__API_KEYS": "e1: x y,e2"})
    assert env.api_key_scopes() == {"e1": Scope(("x", "y")), "e2": None}


def test_one_key_with_two_scopes_is_refused():
    cfg = load_config(environ={"LORAPLEX_SERVER__API_KEYS": "k: a,k: b"})
    with pytest.raises(ConfigError, match="twice"):
        cfg.api_key_scopes()

"""The Engine protocol (server/engine/protocol.py) against both engines: every member exists with
the protocol's parameters. mypy checks the types (app.build_engine, engine/fake.py); this test
fails fast when either engine lacks a member or renames a parameter."""

import inspect

import pytest

from server.engine.fake import FakeEngine
from server.engine.loop import TorchEngine
from server.engine.protocol import Engine, PromptTokenizer


def members(proto):
    own = {n for n in vars(proto) if not n.startswith("_")}
    return sorted(own | set(getattr(proto, "__annotations__", {})))


@pytest.mark.parametrize("impl", [TorchEngine, FakeEngine])
def test_each_engine_has_every_protocol_member_with_its_parameters(impl):
    names = members(Engine)
    assert {"submit", "abort", "load_adapter", "create_blend", "unload_adapter", "stalled", "ready"} <= set(names)
    for name in names:
        want = vars(Engine).get(name)
        if name in getattr(Engine, "__annotations__", {}) and want is None:
            continue  # a data attribute (model_id): set in __init__
        got = getattr(impl, name, None)
        assert got is not None, f"{impl.__name__} lacks {name}"
        if isinstance(want, property):
            assert isinstance(got, property), f"{impl.__name__}.{name} should be a property"
            continue
        want_params = [p for p in inspect.signature(want).parameters.values()]
        got_params = list(inspect.signature(got).parameters.values())
        for w in want_params:  # the protocol's parameters, by name and kind (an engine may add defaults)
            match = [g for g in got_params if g.name == w.name]
            assert match and match[0].kind == w.kind, f"{impl.__name__}.{name}: parameter {w.name}"
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), f"{impl.__name__}.{name}"


def test_model_id_is_set_by_both(tiny_model_dir, tmp_path):
    from server.config import load_config

    assert FakeEngine("m").model_id == "m"
    cfg = load_config(overrides={"model.model": str(tiny_model_dir)})
    assert TorchEngine(cfg.model, cfg.engine, cache_dir=tmp_path).model_id == cfg.model.id


def test_the_fake_tokenizer_is_a_prompt_tokenizer():
    assert isinstance(FakeEngine("m").tokenizer, PromptTokenizer)

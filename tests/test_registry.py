"""Adapter names, store confinement and `model` resolution (FakeEngine)."""

import asyncio
import os

import pytest

from server.engine.fake import FakeEngine
from server.errors import InvalidRequest, NotFound
from server.registry import Registry, check_name


@pytest.fixture
def registry(tiny_store):
    eng = FakeEngine("base-x")
    eng.start()
    return Registry(eng, tiny_store)


@pytest.mark.parametrize("name", ["a", "my-adapter_1.2", "A" * 64, "0x"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "a/b", "a b", "A" * 65, "__base__", "a:b", "..", 5])
def test_bad_names(name):
    with pytest.raises(InvalidRequest):
        check_name(name)


def test_load_and_resolve(registry):
    asyncio.run(registry.load("alpha", "alpha"))
    assert registry.resolve("base-x") is None
    assert registry.resolve("alpha") == "alpha"
    assert registry.resolve("base-x:alpha") == "alpha"
    for bad in ("beta", "base-x:beta", "other:alpha", ""):
        with pytest.raises(NotFound) as e:
            registry.resolve(bad)
        assert e.value.code == "model_not_found" and e.value.param == "model"


def test_load_is_idempotent(registry):
    first = asyncio.run(registry.load("alpha", "alpha"))
    again = asyncio.run(registry.load("alpha", "alpha"))
    assert first is again and len(registry.entries()) == 1


@pytest.mark.parametrize("path", ["../outside", "/etc", "alpha/../../x"])
def test_paths_outside_the_store_refused(registry, path):
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(registry.load("x", path))
    assert e.value.code == "path_outside_store"


def test_symlink_escape_refused(tiny_store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(outside, store / "sneaky")
    reg = Registry(FakeEngine(), store)
    with pytest.raises(InvalidRequest):
        asyncio.run(reg.load("sneaky", "sneaky"))


def test_load_store_registers_valid_folders(registry):
    assert asyncio.run(registry.load_store()) == ["alpha", "beta"]
    assert [e.name for e in registry.entries()] == ["alpha", "beta"]

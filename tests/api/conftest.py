import pytest

from tests.conftest import wait_ready  # noqa: F401  (used by test_models_health)


@pytest.fixture
def client(make_client):
    return make_client()

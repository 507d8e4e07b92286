import pytest

from tests.e2e.actors import Worker


@pytest.fixture(scope="module")
def workers(ray_session):
    ws = [Worker.remote(k) for k in range(4)]
    ray_session.get([w.echo.remote(0) for w in ws])
    return ws


@pytest.fixture(autouse=True)
def _leak_check(no_shm_leak):
    yield

"""Fault-injection tests share the session Ray (tests/conftest.py: ``ray_session``) and
fail any test that leaves dagc segments in /dev/shm (``no_shm_leak``)."""

import pytest


@pytest.fixture(autouse=True)
def _leak_check(no_shm_leak):
    yield


@pytest.fixture
def ray(ray_session):
    return ray_session


@pytest.fixture
def nodes(ray_session):
    """``nodes(n)``: n fresh ``Node`` actors owned by this test, killed when it ends."""
    from tests.faults.actors import Node

    made = []

    def make(n: int, start: int = 0):
        hs = [Node.remote(start + k) for k in range(n)]
        ray_session.get([h.pid.remote() for h in hs], timeout=120)
        made.extend(hs)
        return hs

    yield make
    for h in made:
        try:
            ray_session.kill(h)
        except Exception:
            pass

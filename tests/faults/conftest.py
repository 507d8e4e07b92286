"""Fault-injection tests share the session Ray (tests/conftest.py: ``ray_session``) and
fail any test that leaves dagc segments in /dev/shm (``no_shm_leak``)."""
import pytest


@pytest.fixture(autouse=True)
def _leak_check(no_shm_leak):
    yield


@pytest.fixture
def ray(ray_session):
    return ray_session

"""Shared fixtures. End-to-end tests share one Ray session per test run."""
import glob
import os

import pytest


def _dagc_segments():
    return sorted(os.path.basename(p) for p in glob.glob("/dev/shm/dagc-*"))


@pytest.fixture(scope="session")
def ray_session():
    """A new local Ray of its own (never another session's cluster on this machine).

    Ray records a started cluster in /tmp/ray/ray_current_cluster, where a later plain
    ``ray.init()`` would find it; the file is put back as it was afterwards.
    """
    import ray

    from tests.helpers import ray_address_file_kept
    with ray_address_file_kept():
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=32, include_dashboard=False,
                     log_to_driver=False, configure_logging=True, logging_level="ERROR")
        yield ray
        ray.shutdown()


@pytest.fixture
def no_shm_leak():
    """Fail the test if a DAG it compiled leaves shared-memory segments behind.

    Only segments of DAGs compiled by this process during the test count, so other
    processes using dagc on the machine do not make tests fail.
    """
    from dagc.runtime.compiled import CREATED_PREFIXES
    first = len(CREATED_PREFIXES)
    yield
    import time
    mine = tuple(CREATED_PREFIXES[first:])
    deadline = time.monotonic() + 5
    while True:
        left = {s for s in _dagc_segments() if s.startswith(mine)} if mine else set()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"leaked /dev/shm segments: {sorted(left)}"

"""Shared fixtures. End-to-end tests share one Ray session per test run."""

import glob
import os

import pytest

# IR.verify() after every compiler pass, in every test (dagc.config.VERIFY; read when dagc is
# first imported, which is after this line).
os.environ.setdefault("DAGC_VERIFY", "1")


def _dagc_segments():
    return sorted(os.path.basename(p) for p in glob.glob("/dev/shm/dagc-*"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "fuzz: random-DAG property tests (tests/random_dags.py); a few dozen "
        "examples by default, many more with -m fuzz (DAGC_FUZZ_EXAMPLES)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``soak`` (the long soak) run only when ``-m`` names the marker
    (``pytest -m soak``); the default command deselects them and runs the short soak."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    drop = [it for it in items if it.get_closest_marker("soak") is not None]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it.get_closest_marker("soak") is None]


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
            ray.init(
                address="local",
                num_cpus=32,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=True,
                logging_level="ERROR",
            )
        yield ray
        ray.shutdown()


def _mapped_segments(prefixes) -> set:
    """Segments of these prefixes this process still maps (named or not: a running DAG's
    segments have no names in /dev/shm)."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            i = line.find("/dev/shm/dagc-")
            if i >= 0:
                name = line[i + len("/dev/shm/") :].rstrip("\n").removesuffix(" (deleted)")
                if name.startswith(prefixes):
                    out.add(name)
    return out


@pytest.fixture
def no_shm_leak():
    """Fail the test if a DAG it compiled leaves shared-memory segments behind: a name in
    /dev/shm, or a mapping in this process (a DAG neither torn down nor collected).

    Only segments of DAGs compiled by this process during the test count, so other
    processes using dagc on the machine do not make tests fail.
    """
    from dagc.runtime.driver.compiled import CREATED_PREFIXES

    first = len(CREATED_PREFIXES)
    yield
    import gc
    import time

    mine = tuple(CREATED_PREFIXES[first:])
    if not mine:
        return
    deadline = time.monotonic() + 5
    collected = False
    while True:
        left = {s for s in _dagc_segments() if s.startswith(mine)}
        maps = _mapped_segments(mine)
        if not left and not maps or time.monotonic() > deadline:
            break
        if maps and not collected:  # a CompiledDag dropped in a reference cycle
            gc.collect()
            collected = True
            continue
        time.sleep(0.05)
    assert not left, f"leaked /dev/shm segments: {sorted(left)}"
    assert not maps, f"segments still mapped by the driver (DAG not torn down?): {sorted(maps)}"

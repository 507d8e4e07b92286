"""Stand-ins for the Ray test fixtures that Ray's Compiled Graph tests use.

Ray's ``python/ray/dag/tests/experimental/test_compiled_graphs.py`` does
``from ray.tests.conftest import *``; Ray's pip wheel ships no tests, so when the suite runs
against dagc (``tests/compat/run_ray_suite.py``) the import shim in ``shims/sitecustomize.py``
serves *this* module under the name ``ray.tests.conftest``. These fixtures are dagc's own,
written to behave as Ray's do for that file (what each of Ray's does is noted); they are not
copies of Ray's code.

In the normal test run this file only defines fixtures nobody uses: no Ray is started.
"""

import contextlib
import os

import pytest

# Ray's fixtures start a local Ray with one CPU and a 150 MiB object store in a test
# namespace (python/ray/tests/conftest.py: get_default_fixture_ray_kwargs). The dashboard is
# left out here: it is not used by these tests and costs CPU on small machines.
FIXTURE_RAY_KWARGS = {
    "num_cpus": 1,
    "object_store_memory": 150 * 1024 * 1024,
    "namespace": "default_test_namespace",
    "include_dashboard": False,
}


@contextlib.contextmanager
def _local_ray(**overrides):
    import ray

    kwargs = dict(FIXTURE_RAY_KWARGS)
    kwargs.update(overrides)
    info = ray.init(address="local", **kwargs)
    try:
        yield info
    finally:
        ray.shutdown()


@pytest.fixture
def ray_start_regular(request):
    """Ray's: a new local Ray (1 CPU) for the test, shut down after it; ``request.param``
    (indirect parametrisation) overrides ray.init keywords."""
    with _local_ray(**getattr(request, "param", {})) as info:
        yield info


@pytest.fixture(scope="module")
def ray_start_regular_shared(request):
    """Ray's: as ray_start_regular, one Ray for the whole module."""
    with _local_ray(**getattr(request, "param", {})) as info:
        yield info


@pytest.fixture
def ray_start_2_cpus(request):
    with _local_ray(num_cpus=2, **getattr(request, "param", {})) as info:
        yield info


@pytest.fixture
def shutdown_only():
    """Ray's: starts nothing (the test calls ray.init, or Ray auto-initialises); shuts Ray
    down afterwards."""
    yield None
    import ray

    ray.shutdown()


@pytest.fixture
def ray_start_cluster(request):
    """Ray's: a ``ray.cluster_utils.Cluster`` with ``num_nodes`` nodes (default none, so by
    default the test's first Ray call auto-initialises a local Ray); the driver connects to
    the first node when ``do_init`` (default: when there are nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    param = dict(getattr(request, "param", {}))
    num_nodes = param.pop("num_nodes", 0)
    do_init = param.pop("do_init", num_nodes > 0)
    namespace = param.pop("namespace", FIXTURE_RAY_KWARGS["namespace"])
    node_kwargs = {k: v for k, v in FIXTURE_RAY_KWARGS.items() if k != "namespace"}
    node_kwargs.update(param)
    cluster = Cluster()
    try:
        for i in range(num_nodes):
            cluster.add_node(**node_kwargs)
            if i == 0 and do_init:
                ray.init(address=cluster.address, namespace=namespace)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_tests_dir() -> str | None:
    """The folder holding a local copy of Ray's test file, or None (then compat is skipped)."""
    d = os.environ.get("DAGC_RAY_TESTS", "")
    return d if d and os.path.isfile(os.path.join(d, "test_compiled_graphs.py")) else None

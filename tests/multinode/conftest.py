"""tests/multinode: a local multi-node Ray cluster (ray.cluster_utils.Cluster).

The cluster lives in a child process (cluster_child.py), never in the pytest process, so
these tests coexist with the session-wide ``ray_session`` of tests/e2e in one pytest run.
Deselect them with ``-m "not multinode"``.
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "multinode: starts a local 3-node Ray cluster in a child process "
        "(about 20-35 s on a 2-core machine)",
    )

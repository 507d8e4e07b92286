"""A local 3-node Ray cluster running with TLS (RAY_USE_TLS=1 and a throw-away CA, set for
the cluster's child process, so for every raylet and worker): dagc's cross-node channels
use TLS with Ray's certificates at every end (driver and actors) and the DAG runs.

The channel-level checks (refusals, plaintext clients, flow control over TLS) are in
tests/unit/test_tcp_tls.py, without Ray; this is the end-to-end proof that the ends pick
TLS up from Ray's own settings. One more cluster start (~20-30 s on the 2-core CI box).
"""

from __future__ import annotations

import pytest

from tests import tls_certs
from tests.multinode.test_cluster import check, run_child

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        tls_certs.available() is not None,
        reason=f"no TLS test certificates: {tls_certs.available()}",
    ),
]


@pytest.fixture(scope="module")
def tls_report(tmp_path_factory):
    import ray

    pki = tmp_path_factory.mktemp("pki")
    ca = tls_certs.make_ca(pki, "ca")
    # Ray's gRPC checks the node address against the certificate (dagc's channels do not)
    node = tls_certs.make_cert(pki, "node", ca, ips=("127.0.0.1", ray.util.get_node_ip_address()))
    env = {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": node.cert,
        "RAY_TLS_SERVER_KEY": node.key,
        "RAY_TLS_CA_CERT": ca.cert,
    }
    return run_child(tmp_path_factory.mktemp("multinode-tls"), ["cluster", "dagc_tls"], env)


def test_dagc_tcp_channels_use_ray_tls(tls_report):
    c = check(tls_report, "dagc_tls")
    assert c["env_tls"] and c["results_ok"] and c["big_ok"], c
    assert set(c["ends"]) == {"driver", "a", "b"} and all(c["ends"].values()), c
    assert c["all_tls"], f"a TCP end without TLS: {c['ends']}"


def test_tls_cluster_leaves_no_processes(tls_report):
    assert tls_report["rc"] == 0, f"child exited {tls_report['rc']}:\n{tls_report['log_tail']}"
    assert tls_report["pids"] and not tls_report["leftovers"], tls_report["leftovers"]

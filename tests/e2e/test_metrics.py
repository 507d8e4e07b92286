"""dagc's metrics at Ray's Prometheus endpoint (docs/metrics.md).

The DAG runs in a child process with a Ray of its own (tests/e2e/metrics_child.py): this
needs Ray's metrics agent reporting every half second, which the shared test session does
not ask for. The child prints what the endpoint showed; the assertions are here.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from dagc.runtime.driver import metrics

CHILD = os.path.join(os.path.dirname(__file__), "metrics_child.py")


def _agent_missing() -> str | None:
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError as e:
        return str(e)
    err = get_dashboard_dependency_error()
    return None if err is None else str(err)


@pytest.fixture(scope="module")
def scraped():
    why = _agent_missing()
    if why:
        pytest.skip(f"Ray's metrics agent needs ray[default] (pip install 'dagc[metrics]'): {why}")
    env = dict(os.environ, DAGC_METRICS_INTERVAL="0.5")
    # a session of its own: on a timeout the child and the Ray it started go together
    p = subprocess.Popen(
        [sys.executable, CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"the metrics child did not finish in 240 s:\n{out[-4000:]}")
    assert p.returncode == 0, out[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _get(samples: dict, name: str, **labels):
    return samples.get(f"{name}{dict(sorted(labels.items()))}")


@pytest.mark.timeout(300)
def test_counters_and_gauges_reach_rays_endpoint(scraped):
    live, n, failed = scraped["live"], scraped["n"], scraped["failed"]
    assert failed == sum(1 for i in range(n - 3) if i % 10 == 3) > 0
    assert _get(live, "ray_dagc_executions_total", dag="0") == n
    assert _get(live, "ray_dagc_failures_total", dag="0") == failed
    assert _get(live, "ray_dagc_executions_in_flight", dag="0") == 3
    # the channels' shared memory, as cg.memory() tells it
    assert _get(live, "ray_dagc_shm_bytes", dag="0") == scraped["memory"] > 0


@pytest.mark.timeout(300)
def test_latency_histogram_times_one_execution_in_stride(scraped):
    live, n = scraped["live"], scraped["n"]
    timed = sum(1 for i in range(n - 3) if i % metrics.STRIDE == 0)
    count = _get(live, "ray_dagc_execution_latency_seconds_count", dag="0")
    assert count == timed
    # each execution spins 10 ms of CPU in its first actor
    assert _get(live, "ray_dagc_execution_latency_seconds_sum", dag="0") / count >= 0.01
    assert _get(live, "ray_dagc_execution_latency_seconds_bucket", dag="0", le="0.005") == 0
    assert _get(live, "ray_dagc_execution_latency_seconds_bucket", dag="0", le="+Inf") == count


@pytest.mark.timeout(300)
def test_busy_fraction_per_actor(scraped):
    spin, fail_if = scraped["labels"]
    busy = scraped["busy"]
    # the spinning actor's loop thread is on the CPU most of the time; the other one's
    # waits for it (at most the adaptive wait's polling)
    assert busy[spin] > 0.25, busy
    assert busy[fail_if] < busy[spin] / 2, busy
    assert all(0.0 <= v <= 1.0 for v in busy.values())


@pytest.mark.timeout(300)
def test_gauges_go_to_zero_after_teardown(scraped):
    live, after = scraped["live"], scraped["after"]
    assert _get(after, "ray_dagc_shm_bytes", dag="0") == 0
    assert _get(after, "ray_dagc_executions_in_flight", dag="0") == 0
    for a in scraped["labels"]:
        assert _get(after, "ray_dagc_actor_busy_fraction", dag="0", actor=a) == 0
    # counters keep their totals
    assert _get(after, "ray_dagc_executions_total", dag="0") == scraped["n"]
    assert _get(after, "ray_dagc_failures_total", dag="0") == _get(
        live, "ray_dagc_failures_total", dag="0"
    )

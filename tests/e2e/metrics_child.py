"""Run by tests/e2e/test_metrics.py in a child process: a Ray of its own with a metrics
export port, one DAG driven for a few seconds, and what Ray's Prometheus endpoint then
shows of dagc's metrics. Prints one JSON line (the last line of its output).

A Ray of its own because the shared test session may run without the metrics agent's
report interval this needs (half a second, not ten).
"""

import json
import os
import sys
import time
import urllib.request

os.environ["DAGC_METRICS"] = "1"
os.environ.setdefault("DAGC_METRICS_INTERVAL", "0.5")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray.dag import InputNode  # noqa: E402

import dagc  # noqa: E402
from tests.helpers import ray_address_file_kept  # noqa: E402

BOUND = 90.0  # seconds for the metrics to reach the endpoint


@ray.remote
class Spin:
    def spin(self, x):
        t = time.thread_time() + 0.01  # 10 ms of CPU: this loop is busy
        while time.thread_time() < t:
            pass
        return x

    def fail_if(self, x):
        if x % 10 == 3:
            raise ValueError(f"bad input {x}")
        return x


def scrape(port: int) -> dict:
    """{(name, sorted dagc labels): value} of the ray_dagc_* samples at the endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.startswith("ray_dagc_"):
                labels = tuple(
                    sorted((k, v) for k, v in s.labels.items() if k in ("dag", "actor", "le"))
                )
                out[(s.name, labels)] = s.value
    return out


def wait_for(port: int, ok, what: str) -> dict:
    deadline = time.monotonic() + BOUND
    got: dict = {}
    while time.monotonic() < deadline:
        try:
            got = scrape(port)
        except OSError:
            got = {}
        if ok(got):
            return got
        time.sleep(0.5)
    raise SystemExit(f"metrics never showed {what} within {BOUND} s; last scrape: {got}")


def value(got: dict, name: str, **labels) -> float | None:
    want = tuple(sorted(labels.items()))
    return got.get((name, want))


def main() -> None:
    with ray_address_file_kept():
        info = ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            _system_config={"metrics_report_interval_ms": 500},
        )
        port = info.address_info["metrics_export_port"]
        try:
            result = run(port)
        finally:
            ray.shutdown()
    print(json.dumps(result))


def run(port: int) -> dict:
    a, b = Spin.remote(), Spin.remote()
    with InputNode() as inp:
        dag = b.fail_if.bind(a.spin.bind(inp))
    cg = dagc.compile(dag)
    labels = [x.label for x in cg._ir.actors]
    n = failed = 0
    busy = dict.fromkeys(labels, 0.0)  # the most each actor's gauge showed
    t_end = time.monotonic() + 4.0  # several sampler wakes
    next_scrape = time.monotonic() + 1.0
    while time.monotonic() < t_end:
        try:
            cg.execute(n).get(timeout=30)
        except ValueError:
            failed += 1
        n += 1
        if time.monotonic() > next_scrape:  # the busy gauge while the DAG is busy
            next_scrape += 0.4
            got = scrape(port)
            for x in labels:
                v = value(got, "ray_dagc_actor_busy_fraction", dag="0", actor=x)
                busy[x] = max(busy[x], v or 0.0)
    refs = [cg.execute(0) for _ in range(3)]  # left in flight (and not failing)
    n += 3

    def ready(got):
        return (
            value(got, "ray_dagc_executions_total", dag="0") == n
            and value(got, "ray_dagc_executions_in_flight", dag="0") == 3
            and value(got, "ray_dagc_failures_total", dag="0") == failed
            and all(
                value(got, "ray_dagc_actor_busy_fraction", dag="0", actor=x) is not None
                for x in labels
            )
            and (value(got, "ray_dagc_execution_latency_seconds_count", dag="0") or 0) > 0
            and (value(got, "ray_dagc_shm_bytes", dag="0") or 0) > 0
        )

    live = wait_for(port, ready, "the live DAG's metrics")
    memory = cg.memory()["shm_bytes"]
    for r in refs:
        r.get(timeout=30)
    cg.teardown()
    after = wait_for(
        port,
        lambda g: (
            value(g, "ray_dagc_shm_bytes", dag="0") == 0
            and value(g, "ray_dagc_executions_in_flight", dag="0") == 0
        ),
        "the torn-down DAG's gauges at 0",
    )

    def pick(got):
        return {f"{k[0]}{dict(k[1])}": v for k, v in got.items()}

    return {
        "n": n,
        "failed": failed,
        "labels": labels,
        "memory": memory,
        "busy": busy,
        "live": pick(live),
        "after": pick(after),
    }


if __name__ == "__main__":
    main()

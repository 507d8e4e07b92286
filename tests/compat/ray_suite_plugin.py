"""pytest plugin for the Ray-suite run (``-p tests.compat.ray_suite_plugin``).

* every test gets the runner's timeout (``DAGC_RAY_SUITE_TIMEOUT`` seconds), overriding the
  file's own ``pytest.mark.timeout(500)``, so one hang cannot stall the run;
* a watchdog ends the processes a test started (descendants of this pytest created during
  the test, by pid) if the test is still running ``DAGC_RAY_SUITE_GRACE`` seconds (30) after
  its timeout: pytest-timeout's exception cannot end a test stuck in ``Popen.__exit__``
  waiting for a hung child driver (``run_string_as_driver``);
* the outcome of every case is written as JSON lines to ``DAGC_RAY_SUITE_RESULTS``;
* ``ray._private.test_utils.run_string_as_driver`` is aliased here too, in the pytest
  process: pytest's assertion rewriter, not the sitecustomize hook, loads that module there.
"""

import json
import os
import threading
import time

import pytest

_RESULTS = os.environ.get("DAGC_RAY_SUITE_RESULTS")
_TIMEOUT = os.environ.get("DAGC_RAY_SUITE_TIMEOUT")
_GRACE = float(os.environ.get("DAGC_RAY_SUITE_GRACE", "30"))


def pytest_configure(config):
    import ray._private.test_utils as tu

    if not hasattr(tu, "run_string_as_driver"):
        from ray._common.test_utils import run_string_as_driver

        tu.run_string_as_driver = run_string_as_driver


def pytest_collection_modifyitems(config, items):
    if _TIMEOUT:
        for item in items:
            item.add_marker(pytest.mark.timeout(float(_TIMEOUT), method="signal"))


def _end_processes_started_since(start: float, nodeid: str) -> None:
    import psutil

    try:
        procs = [
            p for p in psutil.Process().children(recursive=True) if p.create_time() >= start - 1
        ]
    except Exception:
        return
    if not procs:
        return
    print(
        f"\n[dagc watchdog] {nodeid} still running {_GRACE:.0f} s after its timeout: "
        f"ending the {len(procs)} process(es) it started",
        flush=True,
    )
    for p in procs:
        try:
            p.terminate()
        except Exception:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except Exception:
            pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timer = None
    if _TIMEOUT:
        timer = threading.Timer(
            float(_TIMEOUT) + _GRACE, _end_processes_started_since, args=(time.time(), item.nodeid)
        )
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _reason(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    return str(report.longrepr or "")


def pytest_runtest_logreport(report):
    if not _RESULTS:
        return
    if report.when == "call" or report.outcome != "passed":
        rec = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": round(report.duration, 2),
            "reason": "" if report.passed else _reason(report)[:2000],
        }
        with open(_RESULTS, "a") as f:
            f.write(json.dumps(rec) + "\n")

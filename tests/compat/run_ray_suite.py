"""Run Ray's own Compiled Graph test file against dagc (``dagc.ray_compat``'s patch).

    python tests/compat/run_ray_suite.py --ray-tests /work/ray-tests [--timeout 120]
        [-k EXPR] [--no-patch] [--json OUT] [--min-pass N] [-- extra pytest args]

``--ray-tests`` (default ``$DAGC_RAY_TESTS``) is a folder holding a local copy of Ray's
``python/ray/dag/tests/experimental/test_compiled_graphs.py`` and ``actor_defs.py``, unchanged.
Nothing is fetched. The file runs under pytest with:

* ``DAGC_PATCH_RAY=1`` (unless ``--no-patch``, which runs Ray's own Compiled Graph for a
  baseline) and ``tests/compat/shims`` first on ``PYTHONPATH`` - see ``shims/sitecustomize.py``
  for what that makes importable and patched, in the driver and in every Ray worker;
* ``RAY_ADDRESS=local``, so a plain ``ray.init()`` in a test starts its own Ray and never joins
  another cluster on the machine; ``/tmp/ray/ray_current_cluster`` is put back afterwards;
* a per-test timeout (``--timeout``, signal method so fixtures still shut Ray down) and a
  whole-run timeout; a working directory of its own (``visualize()`` writes files there).

It prints pass/fail per case with the failure's first line, and the total. Afterwards it
ends any process of this run still alive (found by a run id in their environment) and reports
new ``/dev/shm/dagc-*`` segments.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TEST_FILE = "test_compiled_graphs.py"
ADDRESS_FILE = "/tmp/ray/ray_current_cluster"


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ray-tests",
        default=os.environ.get("DAGC_RAY_TESTS"),
        help="folder with Ray's test_compiled_graphs.py and actor_defs.py",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per test")
    p.add_argument(
        "--total-timeout", type=float, default=3 * 3600.0, help="seconds for the whole run"
    )
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    p.add_argument(
        "--no-patch", action="store_true", help="run against Ray's own Compiled Graph (baseline)"
    )
    p.add_argument("--json", default=None, help="write the per-case results here")
    p.add_argument("--min-pass", type=int, default=None, help="exit 1 if fewer cases pass")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    return p.parse_args(argv)


def _own_processes(run_id: str) -> list:
    try:
        import psutil
    except ImportError:
        return []
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("DAGC_RAY_SUITE_RUN_ID") == run_id:
                found.append(proc)
        except Exception:
            continue
    return found


def _end_own_processes(run_id: str) -> int:
    """Terminate, then kill, processes this run started that are still alive (by pid)."""
    procs = _own_processes(run_id)
    if not procs:
        return 0
    import psutil

    for p in procs:
        try:
            p.terminate()
        except Exception:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except Exception:
            pass
    return len(procs)


def _segments() -> set:
    return set(glob.glob("/dev/shm/dagc-*"))


def _final(records: list[dict], collected: list[str]) -> dict[str, dict]:
    """One result per case: failed (any phase failed), error (setup/teardown), skipped,
    passed, or "not run" (never reported: the run was cut short)."""
    out: dict[str, dict] = {
        n: {"outcome": "not run", "reason": "", "duration": 0.0} for n in collected
    }
    for r in records:
        cur = out.setdefault(r["nodeid"], {"outcome": "not run", "reason": "", "duration": 0.0})
        cur["duration"] = round(cur["duration"] + r.get("duration", 0.0), 2)
        if r["outcome"] == "failed":
            if cur["outcome"] in ("failed", "error"):
                continue
            cur["outcome"] = "failed" if r["when"] == "call" else "error"
            cur["reason"] = f"[{r['when']}] {r['reason']}" if r["when"] != "call" else r["reason"]
        elif r["outcome"] == "skipped" and cur["outcome"] == "not run":
            cur["outcome"], cur["reason"] = "skipped", r["reason"]
        elif r["outcome"] == "passed" and r["when"] == "call" and cur["outcome"] == "not run":
            cur["outcome"] = "passed"
    return out


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:160]
    return ""


def run(argv=None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    if not a.ray_tests or not os.path.isfile(os.path.join(a.ray_tests, TEST_FILE)):
        print(
            f"no {TEST_FILE} in --ray-tests / $DAGC_RAY_TESTS ({a.ray_tests!r}); put a local "
            f"copy of Ray's python/ray/dag/tests/experimental/{TEST_FILE} and actor_defs.py "
            f"there (nothing is fetched).",
            file=sys.stderr,
        )
        return 2
    ray_tests = os.path.abspath(a.ray_tests)
    run_id = uuid.uuid4().hex
    work = tempfile.mkdtemp(prefix="dagc-ray-suite-")
    results = os.path.join(work, "results.jsonl")
    ini = os.path.join(work, "pytest.ini")
    with open(ini, "w") as f:
        f.write("[pytest]\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(HERE, "shims"), REPO] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env["DAGC_RAY_TESTS"] = ray_tests
    env["DAGC_RAY_SUITE_RESULTS"] = results
    env["DAGC_RAY_SUITE_TIMEOUT"] = str(a.timeout)
    env["DAGC_RAY_SUITE_RUN_ID"] = run_id
    env["RAY_ADDRESS"] = "local"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.no_patch:
        env.pop("DAGC_PATCH_RAY", None)
    else:
        env["DAGC_PATCH_RAY"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        os.path.join(ray_tests, TEST_FILE),
        "-c",
        ini,
        "--rootdir",
        ray_tests,
        "-p",
        "no:cacheprovider",
        "-p",
        "tests.compat.ray_suite_plugin",
        "-q",
        "-rN",
        "--no-header",
        "--timeout",
        str(a.timeout),
        "--timeout-method",
        "signal",
    ]
    if a.keyword:
        cmd += ["-k", a.keyword]
    cmd += a.pytest_args
    collected = subprocess.run(
        cmd + ["--collect-only"], env=env, cwd=work, capture_output=True, text=True, timeout=600
    )
    ids = [ln.strip() for ln in collected.stdout.splitlines() if "::" in ln]
    ids = [i if i.startswith(TEST_FILE) else os.path.relpath(i, ray_tests) for i in ids]
    if not ids:
        print(collected.stdout[-4000:], collected.stderr[-4000:], file=sys.stderr)
        print("collected no tests", file=sys.stderr)
        return 2
    mode = "Ray's own Compiled Graph (--no-patch)" if a.no_patch else "dagc (DAGC_PATCH_RAY=1)"
    print(
        f"{len(ids)} cases from {ray_tests}/{TEST_FILE} against {mode}; "
        f"timeout {a.timeout:.0f} s each; work dir {work}",
        flush=True,
    )

    address_before = open(ADDRESS_FILE).read() if os.path.exists(ADDRESS_FILE) else None
    segments_before = _segments()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=work, start_new_session=True)
    try:
        rc = proc.wait(timeout=a.total_timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        print(
            f"whole-run timeout ({a.total_timeout:.0f} s) or interrupt: stopping the run",
            file=sys.stderr,
        )
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except Exception:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except Exception:
                pass
        rc = -1
    elapsed = time.monotonic() - t0
    time.sleep(2)
    ended = _end_own_processes(run_id)
    try:
        now = open(ADDRESS_FILE).read() if os.path.exists(ADDRESS_FILE) else None
        if now != address_before:
            if address_before is None:
                os.unlink(ADDRESS_FILE)
            else:
                with open(ADDRESS_FILE, "w") as f:
                    f.write(address_before)
    except OSError:
        pass

    records = []
    if os.path.exists(results):
        with open(results) as f:
            records = [json.loads(line) for line in f if line.strip()]
    final = _final(records, ids)
    width = max(len(n) for n in final)
    counts: dict[str, int] = {}
    for nodeid, r in final.items():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        tag = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}.get(
            r["outcome"], "NOTRUN"
        )
        line = f"{tag:6} {nodeid:{width}}  {r['duration']:6.1f}s"
        if r["outcome"] != "passed":
            line += "  " + _first_line(r["reason"])
        print(line)
    passed = counts.get("passed", 0)
    print(
        f"\nTOTAL: {passed}/{len(final)} passed  "
        + "  ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "passed")
        + f"  ({elapsed:.0f} s, pytest exit {rc})"
    )
    if ended:
        print(f"ended {ended} leftover process(es) of this run", file=sys.stderr)
    new_segments = sorted(_segments() - segments_before)
    if new_segments:
        print(
            f"new /dev/shm/dagc-* segments since the run started (this run or another "
            f"on the machine): {new_segments[:10]}",
            file=sys.stderr,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "mode": "ray" if a.no_patch else "dagc",
                    "passed": passed,
                    "total": len(final),
                    "counts": counts,
                    "cases": final,
                },
                f,
                indent=1,
            )
    if a.min_pass is not None and passed < a.min_pass:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())

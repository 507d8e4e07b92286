"""A DAG's latency alone on its actors, and beside a second DAG on the same actors.

    python benchmarks/multi_dag.py [--quick] [--json out.json]

Per case (``echo1``: one actor; ``chain2``: a -> b, the second DAG b -> a), on the same warm
actors, the round-trip p50/p90 of ``execute(x).get()`` of DAG 1 in blocks of each variant,
alternating (so load that comes and goes on the machine falls on all of them alike):

- ``alone-nolock``: DAG 1's loops swapped to its modules with the method lock's two lines
  taken out (the code dagc generated before several DAGs per actor; the swap is the one
  ``cg.profile`` uses), so the lock's own cost shows;
- ``alone``: the generated modules as they are (each method call holds the actor's lock);
- ``beside-idle``: a second DAG compiled on the same actors, idle;
- ``beside-busy``: a second DAG on the same actors executed back to back, all the time,
  by another driver process (an actor that compiled it), so that driver's GIL is its own.

Ratios are against ``alone-nolock`` of the same case (the same DAG 1 throughout). With
``RAY_ADDRESS`` set it joins that cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ray  # noqa: E402

import dagc  # noqa: E402

_LOCK_LINES = re.compile(r"^ *lock_acquire\(\)\n|^ *finally:\n *lock_release\(\)\n", re.M)


@ray.remote
class Stage:
    def echo(self, x):
        return x


@ray.remote
class Hammer:
    """Another driver: compiles the second DAG over the same actors and keeps it busy."""

    def start(self, actors: list, case: str) -> None:
        self.cg = dagc.compile(build(case, actors[::-1]))
        self.n, self.stop_flag = 0, threading.Event()

        def run():
            while not self.stop_flag.is_set():
                self.cg.execute(1).get(timeout=60)
                self.n += 1

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self.stop_flag.set()
        self.thread.join(60)
        self.cg.teardown()
        return self.n


def build(case: str, actors: list):
    with dagc.InputNode() as inp:
        if case == "echo1":
            return actors[0].echo.bind(inp)
        return actors[1].echo.bind(actors[0].echo.bind(inp))


def latency(cg, n: int, warmup: int) -> list[int]:
    """``n`` round trips of ``execute(1).get()`` after ``warmup`` more, in ns."""
    for _ in range(warmup):
        cg.execute(1).get(timeout=60)
    clock, out = time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        cg.execute(1).get(timeout=60)
        out.append(clock() - t0)
    return out


def swap_lock(cg, locked: bool) -> None:
    """Rebind DAG 1's loops to its modules without (or back with) the lock's lines, through
    the profiler's swap (private API: a benchmark's A/B, not a feature)."""
    prof = cg._profiler
    if locked:
        prof._swap(False)
        return
    srcs = [_LOCK_LINES.sub("", cg._modules[a.id].source) for a in cg._ir.actors]
    assert all("lock_acquire()" not in s for s in srcs)
    prof._sources = srcs
    try:
        prof._swap(True)
    finally:
        prof._sources = None


def one_block(v, cg, case, actors, cfg, busy: list) -> list[int]:
    """One block of variant ``v`` on DAG 1 (``cg``), set up and undone around it."""
    n, warm = cfg["n"], cfg["warmup"]
    if v == "alone-nolock":
        swap_lock(cg, locked=False)
        try:
            return latency(cg, n, warm)
        finally:
            swap_lock(cg, locked=True)
    if v == "alone":
        return latency(cg, n, warm)
    if v == "beside-idle":
        with dagc.compile(build(case, actors[::-1])) as cg2:
            for _ in range(50):
                cg2.execute(1).get(timeout=60)
            time.sleep(0.3)  # past its loops' polling budget
            return latency(cg, n, warm)
    h = Hammer.remote()  # beside-busy
    try:
        ray.get(h.start.remote(actors, case), timeout=120)
        time.sleep(0.2)
        out = latency(cg, n, warm)
        busy.append(ray.get(h.stop.remote(), timeout=120))
        return out
    finally:
        ray.kill(h)


def _p(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] / 1e3


def run_case(case, actors, variants, cfg) -> dict:
    """Blocks of every variant back to back (order rotated each block) on one DAG 1. The
    machine's load comes and goes between blocks, so each block's p50 is compared with the
    ``alone-nolock`` p50 of the same block: the median of those ratios is the figure."""
    blocks: list = []
    busy: list = []
    cg = dagc.compile(build(case, actors))
    try:
        for b in range(cfg["blocks"]):
            k = b % len(variants)
            blocks.append(
                {v: one_block(v, cg, case, actors, cfg, busy) for v in variants[k:] + variants[:k]}
            )
    finally:
        cg.teardown()
    out = {}
    for v in variants:
        p50s = [_p(blk[v], 0.5) for blk in blocks]
        out[v] = {
            "p50_us": round(statistics.median(p50s), 1),
            "p90_us": round(statistics.median(_p(blk[v], 0.9) for blk in blocks), 1),
            "ratio_p50": round(
                statistics.median(_p(blk[v], 0.5) / _p(blk[variants[0]], 0.5) for blk in blocks), 3
            ),
            "block_p50s_us": [round(x, 1) for x in p50s],
        }
    return {"latency": out, "busy_executions_per_block": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = (
        {"blocks": 8, "n": 300, "warmup": 50}
        if args.quick
        else {"blocks": 24, "n": 400, "warmup": 50}
    )
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS", "local"),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
        )
    actors = [Stage.remote() for _ in range(2)]
    ray.get([a.echo.remote(0) for a in actors])
    variants = ["alone-nolock", "alone", "beside-idle", "beside-busy"]
    report = {}
    for case in ("echo1", "chain2"):
        got = run_case(case, actors, variants, cfg)
        report[case] = got
        print(
            f"\n{case} ({cfg['blocks']} blocks x {cfg['n']} executions per variant; medians "
            f"over blocks of each block's p50, p90, and p50 / the same block's alone-nolock)"
        )
        print(f"  {'variant':14s} {'p50 us':>9s} {'p90 us':>9s} {'p50 / alone-nolock':>19s}")
        for v in variants:
            e = got["latency"][v]
            print(f"  {v:14s} {e['p50_us']:9.1f} {e['p90_us']:9.1f} {e['ratio_p50']:19.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "cases": report}, f, indent=2)


if __name__ == "__main__":
    main()

"""Soak: many executions of a 3-actor DAG with mixed payload sizes, watching for leaks.

    python benchmarks/soak.py [--executions 200000] [--window 4] [--reports 10] [--json F]

The DAG is ``x = a.fwd(inp); y = b.fwd(x); out = c.merge(x, y)`` (a fan-out and a fan-in,
every edge a shared-memory channel). Payloads cycle through an int, 1 KiB of bytes,
64 KiB and 256 KiB numpy arrays, and every 100th execution a 2 MiB array (bigger than
the 1 MiB default slot: the channels grow once, during warm-up). ``--window`` executions
are kept in flight. After a warm-up, it samples the driver and the actors (by pid, with
psutil): RSS and private memory (RSS less shared pages), open fds, threads, and this
DAG's segments (count and bytes of those the processes map, read from /proc/<pid>/maps,
since a segment's /dev/shm name may be gone while it is mapped; plus any still named), then
again every ``executions / reports`` executions, and prints the table and the growth from
the first sample to the last. With ``RAY_ADDRESS`` set it joins that cluster; otherwise it
starts a local Ray.

``tests/faults/test_soak.py`` runs :func:`soak` with 3,000 executions in every test run
and with 200,000 under ``pytest -m soak``, and asserts the growth stays within a small
constant.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BIG = 2 << 20
CYCLE = (0, 1 << 10, 64 << 10, 256 << 10)


@ray.remote
class Stage:
    def fwd(self, p):
        return p

    def merge(self, p, q):
        return (_nbytes(p), q)

    def pid(self):
        return os.getpid()


def _nbytes(p) -> int:
    if isinstance(p, np.ndarray):
        return int(p.nbytes)
    if isinstance(p, (bytes, bytearray)):
        return len(p)
    return 8


def payload(i: int):
    """The i-th payload: an int, bytes or a uint8 array; deterministic in i."""
    n = BIG if i % 100 == 99 else CYCLE[i % len(CYCLE)]
    if n == 0:
        return i
    if n == 1 << 10:
        return bytes([i % 251]) * n
    return np.full(n, i % 251, dtype=np.uint8)


def check(i: int, out) -> None:
    p = payload(i)
    n, q = out
    assert n == _nbytes(p), (i, n)
    if isinstance(p, np.ndarray):
        assert q.nbytes == p.nbytes and q[0] == p[0] and q[-1] == p[-1], i
    else:
        assert q == p, i


def build(actors=None):
    from dagc import InputNode

    a, b, c = actors or [Stage.remote() for _ in range(3)]
    with InputNode() as inp:
        x = a.fwd.bind(inp)
        y = b.fwd.bind(x)
        dag = c.merge.bind(x, y)
    return dag, (a, b, c)


def sample(token: str, pids: dict) -> dict:
    """RSS and private memory (bytes), fds and threads of each process; this DAG's
    segments (mapped or named)."""
    import psutil

    procs = {}
    for name, pid in pids.items():
        p = psutil.Process(pid)
        with p.oneshot():
            mi = p.memory_info()
            # private = RSS less file and shared-memory pages: the channels' slots count in
            # RSS once touched (a deeper slot can first be touched late in a run), so a
            # leak shows in ``private``; the segments' own size is tracked below
            procs[name] = {
                "rss": mi.rss,
                "private": mi.rss - getattr(mi, "shared", 0),
                "fds": p.num_fds(),
                "threads": p.num_threads(),
            }
    segs = mapped_segments(token, pids.values())
    return {"procs": procs, "segments": len(segs), "segment_bytes": sum(segs.values())}


def mapped_segments(token: str, pids) -> dict:
    """{path: bytes} of this DAG's segments: those any of ``pids`` maps (from
    /proc/<pid>/maps; a segment's name may already be unlinked while it is mapped) and
    those still named in /dev/shm."""
    prefix = f"/dev/shm/dagc-{token}-"
    segs: dict = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(prefix)
                    if i < 0:
                        continue
                    path = line[i:].rstrip("\n").removesuffix(" (deleted)")
                    lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    segs[path] = max(segs.get(path, 0), hi - lo)
        except OSError:
            pass
    for path in glob.glob(prefix + "*"):
        try:
            segs.setdefault(path, os.stat(path).st_size)
        except FileNotFoundError:
            pass
    return segs


def soak(
    executions: int,
    actors=None,
    window: int = 4,
    warmup: int = 1000,
    reports: int = 10,
    on_sample=None,
    **compile_options,
) -> dict:
    """Run the soak; returns {"samples": [...], "growth": {...}, "executions", "seconds"}."""
    import dagc

    dag, (a, b, c) = build(actors)
    pids = {"driver": os.getpid()}
    pids.update(zip(("a", "b", "c"), ray.get([h.pid.remote() for h in (a, b, c)], timeout=120)))
    cg = dagc.compile(dag, max_inflight=max(8, window), **compile_options)
    token = cg._session.token
    samples = []
    try:

        def run(start: int, n: int) -> None:
            pending = []
            for i in range(start, start + n):
                pending.append((i, cg.execute(payload(i))))
                if len(pending) >= window:
                    j, r = pending.pop(0)
                    check(j, r.get(timeout=60))
            for j, r in pending:
                check(j, r.get(timeout=60))

        run(0, warmup)
        every = max(1, executions // max(1, reports))
        done = 0
        t0 = time.perf_counter()
        s = sample(token, pids)
        s.update(executions=0, seconds=0.0)
        samples.append(s)
        if on_sample:
            on_sample(s)
        while done < executions:
            n = min(every, executions - done)
            run(warmup + done, n)
            done += n
            s = sample(token, pids)
            s.update(executions=done, seconds=time.perf_counter() - t0)
            samples.append(s)
            if on_sample:
                on_sample(s)
        seconds = time.perf_counter() - t0
    finally:
        cg.teardown()
    first, last = samples[0], samples[-1]
    growth = {
        name: {
            k: last["procs"][name][k] - first["procs"][name][k]
            for k in ("rss", "private", "fds", "threads")
        }
        for name in pids
    }
    growth["segments"] = last["segments"] - first["segments"]
    growth["segment_bytes"] = last["segment_bytes"] - first["segment_bytes"]
    left = glob.glob(f"/dev/shm/dagc-{token}-*")
    return {
        "executions": executions,
        "seconds": seconds,
        "samples": samples,
        "growth": growth,
        "segments_after_teardown": len(left),
        "pids": pids,
    }


def _row(s: dict) -> str:
    cells = [f"{s['executions']:>9,}", f"{s['seconds']:>8.1f}"]
    for name in ("driver", "a", "b", "c"):
        p = s["procs"][name]
        cells.append(
            f"{p['rss'] / 2**20:>7.1f}M {p['private'] / 2**20:>6.1f}M {p['fds']:>4} "
            f"{p['threads']:>3}"
        )
    cells.append(f"{s['segments']:>4} {s['segment_bytes'] / 2**20:>6.1f}M")
    return " | ".join(cells)


HEADER = (
    " execs    |  seconds | "
    + " | ".join(f"{n + ' rss':>8} private fds thr" for n in ("driver", "a", "b", "c"))
    + " | segs  bytes"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executions", type=int, default=200_000)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--reports", type=int, default=10)
    ap.add_argument("--json", help="also write the samples and growth here")
    args = ap.parse_args(argv)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(
                num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
            )
    print(
        f"soak: {args.executions:,} executions of a->b->c(a, b), window {args.window}, "
        f"payloads int/1K/64K/256K + 2M every 100th, after {args.warmup:,} warm-up"
    )
    print(HEADER, flush=True)
    res = soak(
        args.executions,
        window=args.window,
        warmup=args.warmup,
        reports=args.reports,
        on_sample=lambda s: print(_row(s), flush=True),
    )
    g = res["growth"]
    print(
        f"\n{res['executions']:,} executions in {res['seconds']:.1f} s "
        f"({res['executions'] / res['seconds']:,.0f}/s)"
    )
    for name in ("driver", "a", "b", "c"):
        x = g[name]
        print(
            f"growth {name:>6}: rss {x['rss'] / 2**20:+.1f} MiB (private "
            f"{x['private'] / 2**20:+.1f} MiB), fds {x['fds']:+d}, threads {x['threads']:+d}"
        )
    print(
        f"growth segments: {g['segments']:+d} ({g['segment_bytes'] / 2**20:+.1f} MiB); "
        f"left after teardown: {res['segments_after_teardown']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Big values: dagc vs Ray Compiled Graph vs the memcpy floor, in one run (issue 12).

    python benchmarks/bigvalues.py [--sizes 1,64,512] [--rounds 2] [--json F]

DAG: numpy ``uint8`` arrays through ``driver -> a.echo -> b.echo -> driver`` (two actors,
three hops), default options of each system (``dagc.compile(dag)``,
``dag.experimental_compile()``), plus a 1 MiB echo through one actor. Rounds alternate
``ray, dagc, ray, dagc``; each compiles afresh on the same two warm actors, runs one
warm-up execution, then times ``execute(x).get()`` one at a time (the per-size count is in
``REPS``); the table shows the median over every timed execution of each system, the
ratio dagc / Ray, and the floor: ``np.copyto`` of the same size in this process (median
of 5), x 3 for the chain (one copy per hop is the least a channel that copies can do).
Targets (issue 12, 2-core machine): 64 MiB chain <= 1.5 x (3 x memcpy) and <= 0.15 x
Ray CG; 1 MiB echo <= 0.2 x Ray CG.

Ray CG's channels are preallocated for the value: ``_buffer_size_bytes`` = the value +
1 MiB at compile, and the actors' ``DAGContext.buffer_size_bytes`` the same (Ray sizes
actor-to-actor channels by that; each case gets two fresh actors). With its default 1 MB
its channels resize for a bigger value, and Ray 2.60's ``teardown()`` then hangs (the
reading actor waits on the resized buffer and never sees the close), so no next round
could run on those actors. Preallocated channels can only make Ray faster. A teardown
that still does not end within 60 s is reported, and the actors are replaced.

After the timed rounds, for dagc only:

- ``/dev/shm`` after a burst: 8 executions of the largest size with 4 in flight, then
  ``SHRINK_AFTER`` + 2 small ones; ``cg.memory()`` (what the DAG's channels hold in
  /dev/shm) at the start, right after the burst, and after the small ones;
- peak RSS of each process (driver, a, b) over one execution of the largest size: each
  process's high-water mark is reset (``/proc/<pid>/clear_refs``), then read back
  (``VmHWM``) minus its RSS before; the issue's bound is payload + slot + a small
  constant per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402  (importable once ROOT is on sys.path)

MiB = 1 << 20
NEW_ACTORS = None  # () -> two fresh warm actors (set by main)
REPS = {1: 300, 64: 12, 512: 3}  # timed executions per round, by size in MiB


def _reps(mib: int) -> int:
    return REPS.get(mib, max(3, min(300, 768 // max(1, mib))))


def memcpy_s(nbytes: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _teardown(cg, timeout: float = 60.0) -> bool:
    """Tear down with a bound (Ray CG 2.60 can hang in teardown); False if it did not end."""
    t = threading.Thread(target=cg.teardown, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def time_case(system: str, actors, mib: int, chain: bool) -> list[float]:
    from ray.dag import InputNode

    import dagc

    a, b = actors
    with InputNode() as inp:
        dag = b.echo.bind(a.echo.bind(inp)) if chain else a.echo.bind(inp)
    # Ray CG: channels preallocated for the value (see the module docstring)
    cg = (
        dagc.compile(dag)
        if system == "dagc"
        else dag.experimental_compile(_buffer_size_bytes=mib * MiB + MiB)
    )
    get = (
        (lambda ref: ref.get(timeout=600))
        if system == "dagc"
        else (lambda ref: __import__("ray").get(ref, timeout=600))
    )
    try:
        x = np.ones(mib * MiB, dtype=np.uint8)
        got = get(cg.execute(x))
        assert got.nbytes == x.nbytes
        del got
        ts = []
        for i in range(_reps(mib)):
            x[0] = i % 256
            t0 = time.perf_counter()
            got = get(cg.execute(x))
            ts.append(time.perf_counter() - t0)
            assert got[0] == i % 256
            del got
        return ts
    finally:
        if not _teardown(cg):
            print(f"  ({system} teardown did not finish in 60 s; new actors)", flush=True)
            import ray

            for h in actors:
                ray.kill(h)
            actors[:] = NEW_ACTORS()


def _shm_total() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_blocks * st.f_frsize


def _hwm_reset(pid: int) -> int:
    """Reset ``pid``'s peak RSS to its current RSS; returns that RSS (bytes)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status(pid, "VmRSS")


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_figures(actors, mib: int) -> dict:
    import ray
    from ray.dag import InputNode

    import dagc
    from dagc.runtime.channels import segment, shm

    a, b = actors
    pids = {"driver": os.getpid(), "a": ray.get(a.pid.remote()), "b": ray.get(b.pid.remote())}
    with InputNode() as inp:
        dag = b.echo.bind(a.echo.bind(inp))
    out: dict = {}
    with dagc.compile(dag) as cg:
        assert cg.execute(0).get(timeout=60) == 0
        out["memory_start"] = cg.memory()
        x = np.ones(mib * MiB, dtype=np.uint8)
        # peak RSS over one execution of the largest size, per process
        base = {k: _hwm_reset(p) for k, p in pids.items()}
        got = cg.execute(x).get(timeout=600)
        assert got.nbytes == x.nbytes
        del got
        out["peak_rss_growth"] = {k: _status(p, "VmHWM") - base[k] for k, p in pids.items()}
        # a burst, 4 in flight
        refs = []
        for _ in range(8):
            refs.append(cg.execute(x))
            if len(refs) == 4:
                refs.pop(0).get(timeout=600)
        for r in refs:
            r.get(timeout=600)
        del refs
        out["memory_burst"] = cg.memory()
        out["shm_used_burst"] = shm.shm_space()[1] - shm.shm_space()[0]
        for i in range(segment.SHRINK_AFTER + 2):
            assert cg.execute(i).get(timeout=60) == i
        out["memory_after"] = cg.memory()
        out["shm_used_after"] = shm.shm_space()[1] - shm.shm_space()[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,64,512", help="MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per system and case")
    ap.add_argument("--no-ray", action="store_true", help="dagc only")
    ap.add_argument("--json", help="also write every number here")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    import ray

    from tests.helpers import ray_address_file_kept

    systems = ["dagc"] if args.no_ray else ["ray", "dagc"]
    res: dict = {"sizes": sizes, "cases": [], "load_start": os.getloadavg()}
    with ray_address_file_kept():
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            object_store_memory=min(12 << 30, int(0.6 * _shm_total())),
        )
        try:

            @ray.remote
            class Stage:
                def __init__(self, buf: int):
                    # Ray CG sizes actor-to-actor channels by the actor's DAGContext
                    from ray.dag.context import DAGContext

                    DAGContext.get_current().buffer_size_bytes = buf

                def echo(self, x):
                    return x

                def pid(self):
                    return os.getpid()

            global NEW_ACTORS
            actors: list = []
            cases = [(1, False)] + [(m, True) for m in sizes]
            for mib, chain in cases:
                name = f"{mib} MiB {'chain (3 hops)' if chain else 'echo (2 hops)'}"
                buf = mib * MiB + MiB  # Ray CG's channels: preallocated for it

                def new_actors(buf=buf):
                    hs = [Stage.remote(buf), Stage.remote(buf)]
                    ray.get([h.pid.remote() for h in hs])
                    return hs

                NEW_ACTORS = new_actors
                for h in actors:
                    ray.kill(h)
                actors = new_actors()
                times = {s: [] for s in systems}
                errors = {}
                for k in range(args.rounds):
                    for s in systems:
                        if s in errors:
                            continue
                        t0 = time.monotonic()
                        try:
                            times[s] += time_case(s, actors, mib, chain)
                        except Exception as e:  # reported, and the case goes on
                            errors[s] = f"{type(e).__name__}: {str(e).splitlines()[-1]}"
                            print(f"  {name}: {s} failed: {errors[s]}", flush=True)
                            for h in actors:
                                ray.kill(h)
                            actors[:] = new_actors()
                            continue
                        print(
                            f"  {name}: {s} round {k + 1} done in {time.monotonic() - t0:.1f} s",
                            flush=True,
                        )
                floor = memcpy_s(mib * MiB) * (3 if chain else 2)
                med = {s: statistics.median(t) for s, t in times.items() if t}
                row = {
                    "case": name,
                    "mib": mib,
                    "chain": chain,
                    "floor_s": floor,
                    "median_s": med,
                    "n": {s: len(t) for s, t in times.items()},
                    "errors": errors,
                }
                res["cases"].append(row)
                print(_row(row), flush=True)
            res["memory"] = memory_figures(actors, max(sizes))
            res["load_end"] = os.getloadavg()
            print(report(res), flush=True)
        finally:
            ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s >= 0.001 else f"{s * 1e6:,.0f} us"


def _row(r: dict) -> str:
    med = r["median_s"]
    d, ray_ = med.get("dagc"), med.get("ray")
    ratio = f"{d / ray_:.3f}" if d and ray_ else "-"
    err = "".join(f"  ({s}: {e})" for s, e in r.get("errors", {}).items())
    return (
        f"{r['case']:<22} ray {_ms(ray_) if ray_ else '-':>10}  dagc {_ms(d):>10}  "
        f"dagc/ray {ratio:>6}  floor {_ms(r['floor_s']):>9}  "
        f"dagc/floor {d / r['floor_s']:.2f}{err}"
    )


def report(res: dict) -> str:
    from dagc.runtime.channels import segment

    lines = [
        "",
        "case                   Ray CG        dagc          dagc/Ray  memcpy floor  dagc/floor",
    ]
    for r in res["cases"]:
        lines.append("  " + _row(r))
    m = res.get("memory")
    if m:

        def mb(n):
            return f"{n / MiB:,.1f} MiB"

        lines += [
            "",
            f"dagc, largest size ({max(res['sizes'])} MiB), 2-actor chain:",
            "  peak RSS growth over one execution: "
            + ", ".join(f"{k} {mb(v)}" for k, v in m["peak_rss_growth"].items()),
            f"  cg.memory() shm_bytes: start {mb(m['memory_start']['shm_bytes'])}, "
            f"after a burst of 8 (4 in flight) {mb(m['memory_burst']['shm_bytes'])} "
            f"(big-value segments {mb(m['memory_burst']['big_bytes'])}), after "
            f"{segment.SHRINK_AFTER + 2} small executions "
            f"{mb(m['memory_after']['shm_bytes'])}",
            f"  /dev/shm used (whole machine): after the burst "
            f"{mb(m['shm_used_burst'])}, after the small ones {mb(m['shm_used_after'])}",
        ]
    lines.append(
        f"load average: start {res['load_start'][0]:.1f}, end {res.get('load_end', (0,))[0]:.1f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

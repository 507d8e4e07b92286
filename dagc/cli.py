"""``dagc compile FILE [-o DIR] [--run N] [--profile] [--lower-only] [--format text|json]``
and ``dagc show DIR``.

FILE is a *DAG file*: a Python file whose ``build()`` returns the Ray DAG to compile
(``examples/pipeline.py``), and may define ``example_input()``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time

from dagc.errors import DagcError


class UsageError(Exception):
    pass


def load_file(path: str, name: str = "dagc_dag_file"):
    """Import the Python file ``path`` as module ``name``, its classes and functions pickled
    by value.

    The actors cannot import the file by that name (it is no module on their ``sys.path``):
    without this, a class or function of the file that is not itself a ``@ray.remote``
    class (a model layer, a helper an actor method calls) would be pickled by reference
    and the actor would fail with "No module named 'dagc_dag_file'". By value, it travels
    to the actors as it would from a script run as ``__main__``.
    """
    import ray.cloudpickle

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path}: not a Python file that can be imported")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    ray.cloudpickle.register_pickle_by_value(mod)  # before the file runs: it may
    try:  # create actors at import
        spec.loader.exec_module(mod)
    except BaseException:
        ray.cloudpickle.unregister_pickle_by_value(mod)
        del sys.modules[name]
        raise
    return mod


def load_dag_file(path: str):
    """Import the DAG file as a module (see :func:`load_file`); it must define build()."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    mod = load_file(path)
    if not callable(getattr(mod, "build", None)):
        raise UsageError(
            f"{path} defines no build() function; it must define build() "
            f"returning a Ray DAG (and may define example_input())."
        )
    return mod


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or "local",
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def _progress(total: int, label: str, enabled: bool):
    if not enabled:
        return None
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        p = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            transient=True,
            console=__import__("rich.console").console.Console(stderr=True),
        )
        return p, p.add_task(label, total=total)
    except Exception:
        return None


def run_n(cg, args: tuple, n: int, show_progress: bool) -> dict:
    lat = []
    pb = _progress(n, "run", show_progress and n >= 2000)
    if pb:
        pb[0].start()
    try:
        for _ in range(min(100, n)):  # warm-up
            cg.execute(*args).get()
        t_all = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            cg.execute(*args).get()
            lat.append(time.perf_counter() - t)
            if pb and not i % 256:
                pb[0].update(pb[1], completed=i)
        wall = time.perf_counter() - t_all
    finally:
        if pb:
            pb[0].stop()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6
    return {
        "executions": n,
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "mean_us": statistics.fmean(lat) * 1e6,
        "throughput_per_s": n / wall,
    }


def cmd_compile(ns) -> int:
    import dagc

    if ns.lower_only and (ns.run or ns.profile):
        raise UsageError("--lower-only starts no loops, so it cannot --run or --profile.")
    mod = load_dag_file(ns.file)
    init_ray()
    dag = mod.build()
    if ns.lower_only:
        return lower_only(ns, dag)
    t0 = time.perf_counter()
    if ns.format == "text" and sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status("compiling (starting the actors' loops)..."):
            cg = dagc.compile(dag)
    else:
        cg = dagc.compile(dag)
    compile_s = time.perf_counter() - t0
    out: dict = {
        "file": ns.file,
        "compile_s": compile_s,
        "timings_s": dict(cg.timings),
        "schedule": cg.schedule.to_dict(),
    }
    try:
        if ns.format == "text":
            print(cg.schedule)
            print(f"\ncompiled in {compile_s * 1e3:.1f} ms")
        args = tuple(mod.example_input()) if hasattr(mod, "example_input") else ()
        if ns.run:
            stats = run_n(cg, args, ns.run, ns.format == "text" and sys.stderr.isatty())
            out["run"] = stats
            if ns.format == "text":
                print(
                    f"\nran {stats['executions']} executions: p50 {stats['p50_us']:.1f} us, "
                    f"p90 {stats['p90_us']:.1f} us, p99 {stats['p99_us']:.1f} us, "
                    f"{stats['throughput_per_s']:.0f} executions/s"
                )
        if ns.profile:
            prof = cg.profile(max(ns.run or 0, 100), *args)
            out["profile"] = prof.to_dict()
            out["schedule"] = cg.schedule.to_dict()  # with the measured timing
            if ns.format == "text":
                print("\n" + prof.summary())
                print(cg.schedule.timing_table())  # predicted vs measured per step
        if ns.output:
            cg.dump(ns.output)
            if ns.format == "text":
                print(f"\nwrote artifacts to {ns.output}/")
    finally:
        cg.teardown()
    if ns.format == "json":
        print(json.dumps(out, indent=1, default=str))
    return 0


def lower_only(ns, dag) -> int:
    """Trace and lower ``dag`` for where its actors run (one read-only call each), print
    the schedule and write the artifacts; no loop is started and no channel made."""
    from dagc.stages import probe, trace

    t0 = time.perf_counter()
    traced = trace(dag)
    _, placement = probe(traced)
    lowered = traced.lower(placement=placement)
    lower_s = time.perf_counter() - t0
    if ns.format == "text":
        print(lowered.as_text())
        print(f"\nprobed the actors and lowered in {lower_s * 1e3:.1f} ms (no loops started)")
    if ns.output:
        lowered.dump(ns.output)
        if ns.format == "text":
            print(f"\nwrote artifacts to {ns.output}/")
    if ns.format == "json":
        print(
            json.dumps(
                {
                    "file": ns.file,
                    "lower_s": lower_s,
                    "timings_s": dict(lowered.timings),
                    "schedule": lowered.schedule.to_dict(),
                },
                indent=1,
                default=str,
            )
        )
    return 0


def cmd_show(ns) -> int:
    from dagc.inspect.artifacts import show

    print(show(ns.dir))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="dagc", description="Ahead-of-time compiler for Ray actor DAGs"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a DAG file's build() DAG, print its schedule")
    c.add_argument(
        "file",
        metavar="FILE",
        help="a DAG file: Python defining build() (and optionally example_input())",
    )
    c.add_argument("-o", "--output", metavar="DIR", help="write the inspection artifacts here")
    c.add_argument(
        "--run", type=int, metavar="N", default=0, help="execute N times and report latency"
    )
    c.add_argument(
        "--profile", action="store_true", help="record per-op timings (adds trace.json with -o)"
    )
    c.add_argument(
        "--lower-only",
        action="store_true",
        help="stop after lowering: print the schedule, write the artifacts with -o; "
        "start no loops, make no channels",
    )
    c.add_argument("--format", choices=("text", "json"), default="text")
    c.set_defaults(fn=cmd_compile)
    s = sub.add_parser("show", help="print a written artifact directory's schedule")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_show)
    ns = p.parse_args(argv)
    try:
        return ns.fn(ns)
    except UsageError as e:
        print(f"dagc: {e}", file=sys.stderr)
        return 2
    except DagcError as e:
        print(f"dagc: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

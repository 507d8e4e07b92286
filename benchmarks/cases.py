"""The side-by-side cases of ``bench.py``: one registry, one entry per case.

A :class:`Case` says which actors it needs (a pool from :data:`POOLS`), how to build its
DAG on them (``build(actors)``, called afresh every round because Ray refuses to compile
one DAG object twice), how to measure a compiled DAG (``measure(cg, get, cfg)``, the same
code for Ray Compiled Graph and dagc: both have ``execute(...)`` and a ref to ``get``), and
the target: ``ratio = dagc / ray`` of the primary metric, ``<= target`` for lower-is-better
metrics, ``>= target`` for higher-is-better ones; ``absolute`` targets judge dagc's own
value instead.

To add a case, write a build function (and a measure function if none of the ones here
fits) and call :func:`register`; ``bench.py --cases NAME`` then runs it alternating with
Ray like every other case. Cases need no changes to ``bench.py``.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


# -- actors ---------------------------------------------------------------------------------
class EchoActor:
    """The actor every built-in case runs on; registered with Ray by :func:`make_pool`."""

    def echo(self, x):
        return x

    def pid(self):
        return os.getpid()


def make_pool(n: int, cls=EchoActor) -> list:
    """``n`` live actors of ``cls``, each already constructed and called once (warm)."""
    import ray
    remote_cls = ray.remote(num_cpus=0)(cls)
    actors = [remote_cls.remote() for _ in range(n)]
    ray.get([a.pid.remote() for a in actors])
    return actors


# A pool is a factory ``n -> actors``; cases name the pool they need and how many actors.
# Pools are created once per run and shared by both systems (same actors, alternating).
POOLS: dict[str, Callable[[int], list]] = {"echo": make_pool}


# -- cases ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str                     # what --cases takes
    title: str                    # one line for the table
    metric: str                   # primary metric key in measure()'s result
    unit: str                     # "us", "exec/s", "s", "%"
    better: str                   # "lower" | "higher" (which value of the metric is better)
    target: float                 # the target on the ratio dagc/ray (or on dagc's value)
    build: Callable[[list], Any]  # actors -> Ray DAG (fresh nodes every call)
    measure: Callable             # (cg, get, cfg) -> {metric: value, ...}
    actors: int = 1
    pool: str = "echo"
    absolute: bool = False        # target judges dagc's own value, not the ratio
    make_input: Callable[[int], Any] = staticmethod(lambda i: i)
    options: dict = field(default_factory=dict)   # per system: {"ray": {...}, "dagc": {...}}
    note: str = ""

    def met(self, ray_value: float | None, dagc_value: float | None) -> bool | None:
        if dagc_value is None or (ray_value is None and not self.absolute):
            return None
        value = dagc_value if self.absolute else self.ratio(ray_value, dagc_value)
        if value is None:
            return None
        return value <= self.target if self.better == "lower" else value >= self.target

    def ratio(self, ray_value: float | None, dagc_value: float | None) -> float | None:
        if ray_value is None or dagc_value is None or ray_value == 0:
            return None
        return dagc_value / ray_value

    def target_text(self) -> str:
        op = "<=" if self.better == "lower" else ">="
        if self.absolute:
            return f"dagc {op} {self.target:g} {self.unit}"
        return f"ratio {op} {self.target:g}"


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} registered twice")
    CASES[case.name] = case
    return case


# -- measurements -----------------------------------------------------------------------------
def _pct(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def measure_latency(cg, get, cfg, make_input=lambda i: i) -> dict:
    """Warm up, then time ``execute(...)`` + get one at a time; p50/p99/mean in us."""
    for i in range(cfg["warmup"]):
        get(cg.execute(make_input(i)))
    xs = []
    clock = time.perf_counter
    for i in range(cfg["latency_n"]):
        x = make_input(i)
        t0 = clock()
        get(cg.execute(x))
        xs.append(clock() - t0)
    xs.sort()
    return {"p50": _pct(xs, 0.5) * 1e6, "p99": _pct(xs, 0.99) * 1e6,
            "mean": statistics.fmean(xs) * 1e6, "n": len(xs)}


def measure_throughput(cg, get, cfg, inflight: int = 4) -> dict:
    """Keep ``inflight`` executions in flight (get the oldest, submit a new one); exec/s."""
    for i in range(cfg["warmup"]):
        get(cg.execute(i))
    n = cfg["throughput_n"]
    q = deque()
    t0 = time.perf_counter()
    for i in range(inflight):
        q.append(cg.execute(i))
    for i in range(inflight, n):
        get(q.popleft())
        q.append(cg.execute(i))
    while q:
        get(q.popleft())
    dt = time.perf_counter() - t0
    return {"throughput": n / dt, "n": n, "inflight": inflight}


def measure_compile(cg, get, cfg) -> dict:
    """The compile time itself is taken by the runner; check the graph runs, once."""
    t0 = time.perf_counter()
    get(cg.execute(1))
    return {"first_result_s": time.perf_counter() - t0}


def measure_idle_cpu(cg, get, cfg) -> dict:
    """Run a little, then: sleep 1 s after the last execution and sample each actor's CPU.

    The sampling itself is done by the runner (it knows the actor pids): this returns the
    time of the last execution so the runner can wait ``idle_delay`` from it.
    """
    for i in range(cfg["warmup"]):
        get(cg.execute(i))
    return {"last_execution": time.monotonic()}


# -- the DAGs -------------------------------------------------------------------------------
def _ray_dag():
    from ray.dag import InputNode, MultiOutputNode
    return InputNode, MultiOutputNode


def echo1(actors):
    InputNode, _ = _ray_dag()
    with InputNode() as inp:
        return actors[0].echo.bind(inp)


def chain(actors):
    InputNode, _ = _ray_dag()
    with InputNode() as inp:
        x = inp
        for a in actors:
            x = a.echo.bind(x)
    return x


def fanout(actors):
    InputNode, MultiOutputNode = _ray_dag()
    with InputNode() as inp:
        return MultiOutputNode([a.echo.bind(inp) for a in actors])


MIB_ARRAY = np.arange((1 << 20) // 8, dtype=np.float64)   # 1 MiB


def _mib(i):
    return MIB_ARRAY


# -- registry -------------------------------------------------------------------------------
register(Case(
    name="echo1", title="1-actor echo, small int", metric="p50", unit="us", better="lower",
    target=0.10, build=echo1, actors=1, measure=measure_latency))
register(Case(
    name="chain2", title="2-actor chain", metric="p50", unit="us", better="lower",
    target=0.10, build=chain, actors=2, measure=measure_latency))
register(Case(
    name="fanout2", title="2-actor fan-out + MultiOutputNode", metric="p50", unit="us",
    better="lower", target=0.15, build=fanout, actors=2, measure=measure_latency))
register(Case(
    name="numpy1m", title="1 MiB numpy echo, 1 actor", metric="p50", unit="us",
    better="lower", target=0.33, build=echo1, actors=1, make_input=_mib,
    measure=lambda cg, get, cfg: measure_latency(cg, get, {**cfg, "latency_n":
                                                          cfg["latency_n_big"]}, _mib)))
register(Case(
    name="throughput", title="pipelined, 4 in flight, 2-actor fan-out", metric="throughput",
    unit="exec/s", better="higher", target=10.0, build=fanout, actors=2,
    measure=measure_throughput))
register(Case(
    name="chain8", title="8-actor chain (more processes than cores)", metric="p50",
    unit="us", better="lower", target=0.5, build=chain, actors=8, measure=measure_latency))
register(Case(
    name="compile", title="compile time, 4-actor chain (warm actors)", metric="compile_s",
    unit="s", better="lower", target=0.2, build=chain, actors=4, measure=measure_compile,
    note="compile_s is the compile call alone; first_result_s adds the first execution"))
register(Case(
    name="idle_cpu", title="idle actor CPU 1 s after last execution (2-actor chain)",
    metric="idle_cpu_above_baseline", unit="%", better="lower", target=1.0, absolute=True,
    build=chain, actors=2, measure=measure_idle_cpu,
    note="CPU% of the busiest actor process over the sample, minus the same actor's CPU% "
         "with no compiled DAG (sampled just before the round); raw values in the JSON"))

# -- later: CPU overlap --------------------------------------------------------------------------
# The CPU overlap case (a 3-stage torch pipeline through gloo: dagc
# overlap_communication=True vs Ray's _overlap_gpu_communication) registers here: add a pool
# of torch actors to POOLS (e.g. POOLS["torch3"] = make_torch_pool), a build function that
# binds the stages with .with_tensor_transport(...) and a measure function (latency or
# throughput), and per-system compile options through Case.options, e.g.
#     options={"ray": {"_overlap_gpu_communication": True},
#              "dagc": {"overlap_communication": True, "communicator": "gloo"}}

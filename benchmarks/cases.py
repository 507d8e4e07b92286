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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    name: str  # what --cases takes
    title: str  # one line for the table
    metric: str  # primary metric key in measure()'s result
    unit: str  # "us", "exec/s", "s", "%"
    better: str  # "lower" | "higher" (which value of the metric is better)
    target: float  # the target on the ratio dagc/ray (or on dagc's value)
    build: Callable[[list], Any]  # actors -> Ray DAG (fresh nodes every call)
    measure: Callable  # (cg, get, cfg) -> {metric: value, ...}
    actors: int = 1
    pool: str = "echo"
    absolute: bool = False  # target judges dagc's own value, not the ratio
    make_input: Callable[[int], Any] = staticmethod(lambda i: i)
    options: dict = field(default_factory=dict)  # per system: {"ray": {...}, "dagc": {...}}
    note: str = ""
    # optional: (system, actors, variant_arg) -> Ray DAG, for DAGs whose nodes differ by
    # system (e.g. Ray's CPU communicator instance vs dagc's communicator edge); when
    # set, it is used instead of ``build``. ``variant_arg`` is None for the two main runs.
    build_for: Callable[..., Any] | None = None
    # more runs in the same alternating rounds, after "ray" and "dagc": each a Variant
    # (its own label, system, compile options); the table shows each one's value and its
    # ratio to Ray CG's median
    variants: tuple = ()
    # more metrics of measure()'s result shown under the primary one, each with the
    # dagc / ray ratio: ((label, key, unit, better), ...)
    extra_metrics: tuple = ()

    def make_dag(self, system: str, actors: list, variant_arg: Any = None):
        if self.build_for is not None:
            return self.build_for(system, actors, variant_arg)
        return self.build(actors)

    def runs(self) -> list:
        """Every run of a round, in order: ray, dagc, then the extra variants."""
        return [
            Variant("ray", "ray", self.options.get("ray", {})),
            Variant("dagc", "dagc", self.options.get("dagc", {})),
            *self.variants,
        ]

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


@dataclass(frozen=True)
class Variant:
    """One run of a round: ``label`` (unique in its case), ``system`` ("ray" | "dagc"),
    its compile options, the argument its case's ``build_for`` gets, and a table title."""

    label: str
    system: str
    options: dict = field(default_factory=dict)
    build_arg: Any = None
    title: str = ""


CASES: dict[str, Case] = {}  # bench.py [--cases ...]: one local Ray
CLUSTER_CASES: dict[str, Case] = {}  # bench.py --cluster: a local 3-node Ray cluster


def register(case: Case, registry: dict | None = None) -> Case:
    registry = CASES if registry is None else registry
    if case.name in CASES or case.name in CLUSTER_CASES:
        raise ValueError(f"case {case.name!r} registered twice")
    labels = [v.label for v in case.runs()]
    if len(set(labels)) != len(labels):
        raise ValueError(f"case {case.name!r}: run labels {labels} are not unique")
    registry[case.name] = case
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
    return {
        "p50": _pct(xs, 0.5) * 1e6,
        "p99": _pct(xs, 0.99) * 1e6,
        "mean": statistics.fmean(xs) * 1e6,
        "n": len(xs),
    }


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


MIB_ARRAY = np.arange((1 << 20) // 8, dtype=np.float64)  # 1 MiB


def _mib(i):
    return MIB_ARRAY


# -- registry -------------------------------------------------------------------------------
register(
    Case(
        name="echo1",
        title="1-actor echo, small int",
        metric="p50",
        unit="us",
        better="lower",
        target=0.10,
        build=echo1,
        actors=1,
        measure=measure_latency,
    )
)
register(
    Case(
        name="chain2",
        title="2-actor chain",
        metric="p50",
        unit="us",
        better="lower",
        target=0.10,
        build=chain,
        actors=2,
        measure=measure_latency,
    )
)
register(
    Case(
        name="fanout2",
        title="2-actor fan-out + MultiOutputNode",
        metric="p50",
        unit="us",
        better="lower",
        target=0.15,
        build=fanout,
        actors=2,
        measure=measure_latency,
    )
)
register(
    Case(
        name="numpy1m",
        title="1 MiB numpy echo, 1 actor",
        metric="p50",
        unit="us",
        better="lower",
        target=0.33,
        build=echo1,
        actors=1,
        make_input=_mib,
        measure=lambda cg, get, cfg: measure_latency(
            cg, get, {**cfg, "latency_n": cfg["latency_n_big"]}, _mib
        ),
    )
)
register(
    Case(
        name="throughput",
        title="pipelined, 4 in flight, 2-actor fan-out",
        metric="throughput",
        unit="exec/s",
        better="higher",
        target=10.0,
        build=fanout,
        actors=2,
        measure=measure_throughput,
    )
)
register(
    Case(
        name="chain8",
        title="8-actor chain (more processes than cores)",
        metric="p50",
        unit="us",
        better="lower",
        target=0.5,
        build=chain,
        actors=8,
        measure=measure_latency,
    )
)
register(
    Case(
        name="compile",
        title="compile time, 4-actor chain (warm actors)",
        metric="compile_s",
        unit="s",
        better="lower",
        target=0.2,
        build=chain,
        actors=4,
        measure=measure_compile,
        note="compile_s is the compile call alone; first_result_s adds the first execution",
    )
)
register(
    Case(
        name="idle_cpu",
        title="idle actor CPU 1 s after last execution (2-actor chain)",
        metric="idle_cpu_above_baseline",
        unit="%",
        better="lower",
        target=1.0,
        absolute=True,
        build=chain,
        actors=2,
        measure=measure_idle_cpu,
        note="CPU% of the busiest actor process over the sample, minus the same actor's CPU% "
        "with no compiled DAG (sampled just before the round); raw values in the JSON",
    )
)

# -- CPU overlap: a 3-stage torch pipeline, tensors between stages (issue 5) -----------------
# Stage s of the pipeline is TorchStage(s): every stage multiplies a (B, D) float32
# activation (4 MiB) through a small 2-layer MLP, (B, D) @ (D, H) -> relu -> @ (H, D),
# about 2 ms on one core; the first stage makes its activation from a cached base and the
# microbatch's scalar input, the last returns a float (the sum), so the driver moves only
# small values and the 4 MiB tensors travel only between stages (2 edges per microbatch).
# One execution runs PIPE_MICROBATCHES microbatches: execute(1, 2, ..., M), inp[m] feeds
# microbatch m.
PIPE_B, PIPE_D, PIPE_H = 1024, 1024, 16  # (B, D) float32 = 4 MiB per activation
PIPE_MICROBATCHES = 4
PIPE_STAGES = 3
# Ray CG 2.60 allocates tensor-transport channels with the actor's DAGContext
# buffer_size_bytes (not the compile call's _buffer_size_bytes); a bigger value grows the
# channel, and a grown actor-to-actor tensor channel never closes: teardown() then waits
# forever on the reading actors' loops. The torch actors therefore start with this buffer
# size, larger than one activation, so no channel grows (see README, "CPU overlap").
PIPE_RAY_BUFFER_BYTES = 16 << 20


class TorchStage:
    """One pipeline stage: a 2-layer MLP on a (B, D) float32 activation, one torch thread."""

    def __init__(self, stage: int = 0, ray_buffer_bytes: int = PIPE_RAY_BUFFER_BYTES):
        import torch

        torch.set_num_threads(1)  # 3 stages + driver on 2 cores: no oversubscription
        g = torch.Generator().manual_seed(1234 + stage)
        self.stage = stage
        self.w1 = torch.randn(PIPE_D, PIPE_H, generator=g) / PIPE_D**0.5
        self.w2 = torch.randn(PIPE_H, PIPE_D, generator=g) / PIPE_H**0.5
        self.base = torch.randn(PIPE_B, PIPE_D, generator=g)
        self.base_h = self.base @ self.w1
        from ray.dag.context import DAGContext

        DAGContext.get_current().buffer_size_bytes = ray_buffer_bytes

    def first(self, m):
        """Stage 0: the activation of microbatch m, (B, D)."""
        import torch

        return torch.relu(self.base_h * (1.0 + 0.01 * m)) @ self.w2

    def mid(self, x):
        import torch

        return torch.relu(x @ self.w1) @ self.w2

    def last(self, x):
        import torch

        return float((torch.relu(x @ self.w1) @ self.w2).sum())

    def pid(self):
        return os.getpid()


def make_torch_pool(n: int) -> list:
    """``n`` TorchStage actors (stage i = actor i), constructed and called once."""
    import ray

    remote_cls = ray.remote(num_cpus=0)(TorchStage)
    actors = [remote_cls.remote(i) for i in range(n)]
    ray.get([a.pid.remote() for a in actors])
    return actors


POOLS["torch"] = make_torch_pool


def ray_cpu_transport(actors: list, kind: str | None = None):
    """What Ray CG 2.60 can use for a CPU tensor edge: its CPUCommunicator (p2p through
    shared-memory channels, collectives through a barrier actor), passed as
    ``with_tensor_transport(transport=<Communicator>)``, else its "shm" transport."""
    if kind == "shm":
        return "shm"
    try:
        from ray.experimental.channel.cpu_communicator import CPUCommunicator
    except ImportError:  # older or newer Ray without it: the shared-memory transport
        return "shm"
    return CPUCommunicator(len(actors), list(actors))


def pipeline3(system: str, actors: list, variant_arg=None, microbatches: int = PIPE_MICROBATCHES):
    """Stage 0 -> 1 -> 2 for every microbatch; the activations as tensor-transport edges.

    dagc: ``with_tensor_transport("nccl")`` is a communicator edge (``communicator="auto"``
    picks gloo on CPU actors). Ray CG: its CPU communicator instance (``variant_arg="shm"``:
    its shared-memory tensor transport).
    """
    InputNode, MultiOutputNode = _ray_dag()
    s0, s1, s2 = actors[:3]
    transport = ray_cpu_transport(actors[:3], variant_arg) if system == "ray" else "nccl"
    with InputNode() as inp:
        outs = []
        for m in range(microbatches):
            x = s0.first.bind(inp[m]).with_tensor_transport(transport=transport)
            x = s1.mid.bind(x).with_tensor_transport(transport=transport)
            outs.append(s2.last.bind(x))
        return MultiOutputNode(outs)


def pipe_args(microbatches: int = PIPE_MICROBATCHES) -> tuple:
    return tuple(range(1, microbatches + 1))


def measure_pipeline(cg, get, cfg) -> dict:
    """p50 latency of one execution (all microbatches), then exec/s with 4 in flight."""
    args = pipe_args()
    first = None
    for _ in range(cfg.get("pipe_warmup", 5)):
        first = get(cg.execute(*args))
    xs = []
    clock = time.perf_counter
    for _ in range(cfg.get("pipe_latency_n", 20)):
        t0 = clock()
        get(cg.execute(*args))
        xs.append(clock() - t0)
    xs.sort()
    n = cfg.get("pipe_throughput_n", 40)
    inflight = 4
    q = deque()
    t0 = clock()
    for _ in range(inflight):
        q.append(cg.execute(*args))
    for _ in range(inflight, n):
        get(q.popleft())
        q.append(cg.execute(*args))
    while q:
        last = get(q.popleft())
    dt = clock() - t0
    return {
        "p50": _pct(xs, 0.5) * 1e6,
        "p99": _pct(xs, 0.99) * 1e6,
        "mean": statistics.fmean(xs) * 1e6,
        "n": len(xs),
        "throughput": n / dt,
        "throughput_n": n,
        "inflight": inflight,
        # the same DAG must give the same numbers on every system and variant
        "checksum": float(sum(first)),
        "checksum_last": float(sum(last)),
    }


_OVERLAP_NOTE = (
    "3 torch stages (2-layer MLP on a 1024x1024 float32 activation, ~2 ms each), "
    f"{PIPE_MICROBATCHES} microbatches per execution, 4 MiB tensors between "
    "stages; dagc: communicator edges (gloo), Ray CG: its CPUCommunicator "
    "(p2p through its shared-memory channels; Ray's overlap option fails on "
    "CPU actors)"
)

register(
    Case(
        name="overlap_cpu",
        title=f"3 torch stages x {PIPE_MICROBATCHES} microbatches, 4 MiB edges",
        metric="p50",
        unit="us",
        better="lower",
        target=1.0,
        build=lambda actors: pipeline3("dagc", actors),
        build_for=pipeline3,
        actors=PIPE_STAGES,
        pool="torch",
        measure=measure_pipeline,
        options={"ray": {}, "dagc": {"overlap_communication": False}},
        variants=(
            Variant(
                "dagc_overlap", "dagc", {"overlap_communication": True}, title="dagc overlap=True"
            ),
            Variant("ray_shm", "ray", {}, build_arg="shm", title='Ray CG "shm" transport'),
        ),
        extra_metrics=(("throughput, 4 in flight", "throughput", "exec/s", "higher"),),
        note=_OVERLAP_NOTE,
    )
)


# -- cross-node cases (issue 7): bench.py --cluster --------------------------------------------
# A local Ray cluster: head, node1 {"node1": 1}, node2 {"node2": 1}; the driver is on the
# head. Pool "xnode" pins actor i on node1 (even i) or node2 (odd i), so every edge of
# these DAGs crosses nodes: dagc picks TCP channels for them, Ray CG its cross-node
# channels.
CLUSTER_NODES = ("node1", "node2")


def make_xnode_pool(n: int, start: int = 0) -> list:
    import ray

    remote_cls = ray.remote(num_cpus=0)(EchoActor)
    actors = [
        remote_cls.options(resources={CLUSTER_NODES[(start + i) % 2]: 0.01}).remote()
        for i in range(n)
    ]
    ray.get([a.pid.remote() for a in actors])
    return actors


def node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


POOLS["xnode"] = make_xnode_pool

register(
    Case(
        name="x_chain2",
        title="driver -> node1 -> node2 -> driver (2 hops)",
        metric="p50",
        unit="us",
        better="lower",
        target=0.5,
        build=chain,
        actors=2,
        pool="xnode",
        measure=measure_latency,
    ),
    CLUSTER_CASES,
)
register(
    Case(
        name="x_fanout2",
        title="fan-out to node1 + node2, MultiOutputNode",
        metric="p50",
        unit="us",
        better="lower",
        target=0.5,
        build=fanout,
        actors=2,
        pool="xnode",
        measure=measure_latency,
    ),
    CLUSTER_CASES,
)
register(
    Case(
        name="x_tput",
        title="pipelined, 4 in flight, 2-hop cross-node chain",
        metric="throughput",
        unit="exec/s",
        better="higher",
        target=2.0,
        build=chain,
        actors=2,
        pool="xnode",
        measure=measure_throughput,
    ),
    CLUSTER_CASES,
)

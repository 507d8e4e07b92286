"""The user workloads of examples/, run by dagc, Ray Compiled Graph and plain Ray side by side.

    python benchmarks/workloads.py --quick                   # all five, a few minutes
    python benchmarks/workloads.py --cases pp_inference,serving --rounds 5 --json w.json
    python benchmarks/workloads.py --bubble --quick          # pipeline bubble vs theory only
    python benchmarks/workloads.py --scheduler --quick       # reorder gain, predicted makespans

Each workload is one of the examples (``examples/pp_inference.py``, ``tensor_parallel.py``,
``hetero_training.py``, ``serving.py``, ``pipeline_training.py``): the same actors and the
same DAG run under three systems in alternating rounds (``ray, dagc, plain, ray, ...``):

``dagc``   ``dagc.compile(dag)``; tensor edges and all-reduces on dagc's communicator
           (``"nccl"``: NCCL on GPU actors, gloo on CPU ones).
``ray``    ``dag.experimental_compile()``; on CPU actors its tensor edges and collectives use
           Ray's ``CPUCommunicator`` (Ray CG cannot use NCCL there), on GPU actors ``"nccl"``.
``plain``  no compilation: every bound call is an ordinary ``actor.method.remote(...)``, in
           each actor's bind order, upstream results passed as ObjectRefs (the object store
           moves them); an all-reduce is each participant fetching every partial through the
           object store and adding them in rank order on its own device (``__ray_call__``).

Every round builds the DAG afresh on the shared actors (training workloads first reset
their models and optimizers, so every round trains from the same start), compiles it,
measures, checks the results, and tears it down. The table gives the median of every
metric over the rounds of each system and the ratios dagc / Ray CG and dagc / plain Ray; a
workload's results (logits, outputs, losses, answers) must be equal across the three
systems, checked in every round against the first round's and against the single-process
reference of the example.

The scheduler's checks (dagc only) follow: per workload, the makespan the simulator predicts
from a profile's costs (``dagc.compile(dag, costs=cg.profile(n))``) against the one the next
profile measures; the order-matters DAG (an actor's fast local op bound before the feed of
another actor's slow op), bind order against ``reorder="critical-path"``; and the pipeline
bubble of the generated GPipe / 1F1B schedules: theory, predicted, measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SYSTEMS = ("ray", "dagc", "plain")
GET_TIMEOUT_S = 60.0


def load_example(name: str):
    """examples/<name>.py as a module (its classes travel to the actors by value)."""
    from dagc.cli import load_file

    key = f"dagc_example_{name}"
    if key in sys.modules:
        return sys.modules[key]
    return load_file(os.path.join(ROOT, "examples", f"{name}.py"), key)


# -- plain Ray: the same DAG, one .remote() call per bound method ------------------------------
def _reduce_on_actor(_self, op: str, *parts):
    """One participant's all-reduce in plain Ray: add every rank's partial, in rank order,
    on the device of this rank's own partial (the object store brought the others)."""
    import torch

    mine = next((p for p in parts if p.device.type != "cpu"), parts[0])
    out = parts[0].to(mine.device).clone()
    for p in parts[1:]:
        p = p.to(mine.device)
        if op == "sum" or op == "avg":
            out += p
        elif op == "max":
            torch.maximum(out, p, out=out)
        elif op == "min":
            torch.minimum(out, p, out=out)
        elif op == "product":
            out *= p
        else:
            raise ValueError(f"plain Ray all-reduce: unsupported op {op!r}")
    return out / len(parts) if op == "avg" else out


class EagerDag:
    """Runs a Ray DAG with ordinary ``.remote()`` calls: ``execute(*args)`` submits every
    call (each actor's in bind order, so stateful actors see the same order as under a
    compiled graph) and returns the output's ObjectRef (a list for a MultiOutputNode)."""

    def __init__(self, dag):
        from ray.dag import ClassMethodNode, InputAttributeNode, InputNode, MultiOutputNode
        from ray.dag.collective_node import CollectiveOutputNode

        self._kinds = (
            InputNode,
            InputAttributeNode,
            ClassMethodNode,
            MultiOutputNode,
            CollectiveOutputNode,
        )
        self.output = dag
        nodes, deps = {}, {}
        stack = [dag]
        while stack:  # every node the output depends on
            n = stack.pop()
            if id(n) in nodes:
                continue
            nodes[id(n)] = n
            ds = [a for a in self._args(n) if self._is_node(a)]
            if isinstance(n, CollectiveOutputNode) and n._is_class_method_output is False:
                ds = self._group_inputs(n)  # every rank's partial
            if isinstance(n, InputAttributeNode):
                ds = []
            deps[id(n)] = [id(d) for d in ds]
            stack.extend(ds)
        # submission order: dependencies first, each actor's calls in bind order
        by_actor: dict = {}
        for n in nodes.values():
            h = self._actor(n)
            if h is not None:
                by_actor.setdefault(h._actor_id, []).append(n)
        for calls in by_actor.values():
            calls.sort(key=lambda n: (n._get_bind_index(), self._is_output_index(n)))
        nxt = {a: 0 for a in by_actor}
        done: set = set()
        order = []
        pending = list(nodes.values())
        while pending:
            progressed = False
            for n in list(pending):
                if not all(d in done for d in deps[id(n)]):
                    continue
                h = self._actor(n)
                if h is not None:
                    calls = by_actor[h._actor_id]
                    if calls[nxt[h._actor_id]] is not n:
                        continue
                    nxt[h._actor_id] += 1
                order.append(n)
                done.add(id(n))
                pending.remove(n)
                progressed = True
            if not progressed:
                raise RuntimeError("EagerDag: no order runs every actor's calls in bind order")
        self.order = order
        self.uses_fields = any(isinstance(n, InputAttributeNode) for n in order)

    @staticmethod
    def _is_output_index(n) -> int:
        return 1 if getattr(n, "_is_class_method_output", False) else 0

    def _is_node(self, x) -> bool:
        return isinstance(x, self._kinds)

    @staticmethod
    def _args(n) -> list:
        return [*getattr(n, "_bound_args", ()), *getattr(n, "_bound_kwargs", {}).values()]

    def _actor(self, n):
        from ray.dag import ClassMethodNode

        if isinstance(n, ClassMethodNode):
            return n._get_actor_handle()
        return None

    @staticmethod
    def _group_inputs(n) -> list:
        """Every partial of the all-reduce ``n`` belongs to, in rank order (set by
        :func:`_prepare_collectives`)."""
        return list(n._eager_group)

    def execute(self, *args, **kwargs):
        from ray.dag import ClassMethodNode, InputAttributeNode, InputNode, MultiOutputNode
        from ray.dag.collective_node import CollectiveOutputNode

        vals: dict = {}

        def val(x):
            return vals[id(x)] if self._is_node(x) else x

        whole = args[0] if (len(args) == 1 and not kwargs and not self.uses_fields) else None
        for n in self.order:
            if isinstance(n, InputNode):
                vals[id(n)] = whole
            elif isinstance(n, InputAttributeNode):
                k = n._key
                vals[id(n)] = kwargs[k] if isinstance(k, str) else args[k]
            elif isinstance(n, MultiOutputNode):
                vals[id(n)] = [val(a) for a in n._bound_args]
            elif isinstance(n, CollectiveOutputNode):
                if n._is_class_method_output:  # one tensor of a bucketed all-reduce
                    raise NotImplementedError("EagerDag: bucketed all-reduce")
                op = str(n._collective_op._op.reduceOp).split(".")[-1].lower()
                if not n._method_name.startswith("allreduce"):
                    raise NotImplementedError(f"EagerDag: {n._method_name}")
                parts = [val(p) for p in n._eager_group]
                vals[id(n)] = n._get_actor_handle().__ray_call__.remote(
                    _reduce_on_actor, op, *parts
                )
            elif isinstance(n, ClassMethodNode):
                if not n.is_class_method_call:  # one of .options(num_returns=k) results
                    vals[id(n)] = vals[id(n._bound_args[0])][n._class_method_output.output_idx]
                    continue
                method = getattr(n._get_actor_handle(), n._method_name)
                if n._bound_options:
                    method = method.options(**n._bound_options)
                vals[id(n)] = method.remote(
                    *[val(a) for a in n._bound_args],
                    **{k: val(v) for k, v in n._bound_kwargs.items()},
                )
            else:
                raise NotImplementedError(f"EagerDag: {type(n).__name__}")
        return vals[id(self.output)]

    def teardown(self) -> None:
        pass


def _prepare_collectives(dag) -> None:
    """Tag every all-reduce output node with its group's partials in rank order
    (``_eager_group``), which EagerDag reads; Ray keeps them only per output node."""
    from ray.dag import DAGNode
    from ray.dag.collective_node import CollectiveOutputNode

    groups: dict = {}
    seen, stack = set(), [dag]
    while stack:
        n = stack.pop()
        if id(n) in seen or not isinstance(n, DAGNode):
            continue
        seen.add(id(n))
        if isinstance(n, CollectiveOutputNode) and not n._is_class_method_output:
            groups.setdefault(id(n._collective_op), []).append(n)
        stack.extend(
            a
            for a in [*getattr(n, "_bound_args", ()), *getattr(n, "_bound_kwargs", {}).values()]
            if isinstance(a, DAGNode)
        )
    for outs in groups.values():
        handles = outs[0]._collective_op.actor_handles
        by_actor = {o._get_actor_handle()._actor_id: o for o in outs}
        parts = [by_actor[h._actor_id]._bound_args[0] for h in handles]
        for o in outs:
            o._eager_group = parts


# -- the three systems behind one interface ----------------------------------------------------
class Runner:
    """``submit(*args)`` -> handle, ``wait(handle)`` -> value, ``call(*args)`` (thread-safe:
    submit + wait from any thread), ``teardown()``."""

    def __init__(self, system: str, dag, options: dict):
        import ray

        self.system = system
        self._loop = None
        if system == "dagc":
            import dagc

            self.cg = dagc.compile(dag, **options)
            self.submit = self.cg.execute
            self.wait = lambda ref: ref.get(timeout=GET_TIMEOUT_S)
            self.call = lambda *a: self.cg.execute(*a).get(timeout=GET_TIMEOUT_S)
        elif system == "ray":
            if options.get("enable_asyncio"):
                # Ray CG's execute() is not thread-safe; its supported concurrent use is
                # execute_async from one event loop (the one it was compiled in): client
                # threads hand their requests to that loop
                self._loop = loop = asyncio.new_event_loop()

                def run_loop():
                    loop.run_forever()
                    loop.close()

                threading.Thread(target=run_loop, daemon=True).start()

                async def compile_in_loop():
                    return dag.experimental_compile(**options)

                self.cg = asyncio.run_coroutine_threadsafe(compile_in_loop(), self._loop).result(
                    GET_TIMEOUT_S
                )
                self.call = self._call_async
            else:
                self.cg = dag.experimental_compile(**options)
                lock = threading.Lock()

                def call(*a):
                    with lock:
                        return ray.get(self.cg.execute(*a), timeout=GET_TIMEOUT_S)

                self.call = call
            self.submit = self.cg.execute
            self.wait = lambda ref: ray.get(ref, timeout=GET_TIMEOUT_S)
        else:
            _prepare_collectives(dag)
            self.cg = EagerDag(dag)
            self.submit = self.cg.execute
            self.wait = lambda ref: ray.get(ref, timeout=GET_TIMEOUT_S)
            self.call = lambda *a: ray.get(self.cg.execute(*a), timeout=GET_TIMEOUT_S)

    def _call_async(self, *args):
        async def one():
            fut = await self.cg.execute_async(*args)
            return await fut

        return asyncio.run_coroutine_threadsafe(one(), self._loop).result(GET_TIMEOUT_S)

    def teardown(self) -> None:
        try:
            if self._loop is not None:

                async def td():
                    self.cg.teardown()

                asyncio.run_coroutine_threadsafe(td(), self._loop).result(GET_TIMEOUT_S)
            else:
                self.cg.teardown()
        finally:
            if self._loop is not None:  # end Ray's reader tasks, then the loop

                async def cancel_all():
                    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

                try:
                    asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(10)
                finally:
                    self._loop.call_soon_threadsafe(self._loop.stop)


# -- CPU of the actors: a round starts when they are idle --------------------------------------
def actor_pids(actors: list) -> list[int]:
    import ray

    return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors])


def wait_idle(pids: list[int], threshold=5.0, check_s=0.3, max_s=5.0) -> list[float]:
    import psutil

    procs = [psutil.Process(p) for p in pids]
    deadline = time.monotonic() + max_s
    while True:
        a = [sum(p.cpu_times()[:2]) for p in procs]
        t0 = time.monotonic()
        time.sleep(check_s)
        b = [sum(p.cpu_times()[:2]) for p in procs]
        cpu = [100 * (y - x) / (time.monotonic() - t0) for x, y in zip(a, b)]
        if max(cpu) <= threshold or time.monotonic() > deadline:
            return cpu


def on_gpus(actors: list) -> bool:
    import ray

    return bool(ray.get(actors[0].__ray_call__.remote(lambda self: bool(ray.get_gpu_ids()))))


def ray_transport(actors: list):
    """What Ray CG uses for tensor edges and collectives here: NCCL on GPU actors, its CPU
    communicator (through its shared-memory channels and a barrier actor) on CPU actors."""
    if on_gpus(actors):
        return "nccl"
    from ray.experimental.channel.cpu_communicator import CPUCommunicator

    return CPUCommunicator(len(actors), list(actors))


def prepare_actors(actors: list) -> None:
    """Ray CG 2.60 hangs in teardown once an actor-to-actor tensor channel has grown past
    the actor's DAGContext buffer size (see benchmarks/README.md, "CPU overlap"): start
    every actor with a buffer larger than any tensor here (dagc does not use this)."""
    import ray

    def big_buffers(self):
        from ray.dag.context import DAGContext

        DAGContext.get_current().buffer_size_bytes = 16 << 20

    ray.get([a.__ray_call__.remote(big_buffers) for a in actors])


# -- workloads ---------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _close(a, b, tol=1e-5) -> bool:
    """Equal results: tensors/floats within a relative tolerance, everything else equal."""
    import torch

    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_close(x, y, tol) for x, y in zip(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
        )
    if torch.is_tensor(a):
        return (
            torch.is_tensor(b)
            and a.shape == b.shape
            and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
        )
    if isinstance(a, float):
        return abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


@dataclass
class Workload:
    name: str
    title: str
    example: str
    make_actors: Callable[[Any], list]  # example module -> actors
    build: Callable[[Any, list, Any], Any]  # (module, actors, transport) -> DAG
    measure: Callable[[Any, Runner, dict], dict]  # -> metrics + "result"
    metrics: tuple  # (key, label, unit, better)
    reset: Callable[[list], None] | None = None  # before every round
    options: dict = field(default_factory=dict)  # per system compile options
    check: Callable[[Any, Any], bool] | None = None  # result vs the example's reference


WORKLOADS: dict[str, Workload] = {}


def register(w: Workload) -> Workload:
    WORKLOADS[w.name] = w
    return w


# 1. pipeline-parallel inference
def _pp_measure(mod, r: Runner, cfg: dict) -> dict:
    xs = [mod.batch(i) for i in range(8)]
    result = [r.wait(r.submit(xs[i])) for i in range(3)]
    for i in range(cfg["warmup"]):
        r.wait(r.submit(xs[i % 8]))
    out = {"result": result}
    for k in (1, 4, 8):
        lat, q = [], deque()
        n = cfg["pp_n"]
        t_start = time.perf_counter()
        for i in range(n):
            if len(q) == k:
                t0, ref = q.popleft()
                r.wait(ref)
                lat.append(time.perf_counter() - t0)
            q.append((time.perf_counter(), r.submit(xs[i % 8])))
        while q:
            t0, ref = q.popleft()
            r.wait(ref)
            lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
        out[f"p50_{k}"] = _pct(lat, 0.5) * 1e3
        out[f"p99_{k}"] = _pct(lat, 0.99) * 1e3
        out[f"bps_{k}"] = n / wall
    return out


register(
    Workload(
        name="pp_inference",
        title="pipeline-parallel GPT inference (2 stages, 8 blocks)",
        example="pp_inference",
        make_actors=lambda m: m.make_stages(m.STAGES),
        build=lambda m, actors, t: m.build_dag(actors, t),
        measure=_pp_measure,
        metrics=tuple(
            x
            for k in (1, 4, 8)
            for x in (
                (f"p50_{k}", f"latency p50, {k} in flight", "ms", "lower"),
                (f"p99_{k}", f"latency p99, {k} in flight", "ms", "lower"),
                (f"bps_{k}", f"batches/s, {k} in flight", "/s", "higher"),
            )
        ),
        check=lambda m, res: all(
            _close(res[i], m.reference(m.batch(i)), 1e-4) for i in range(len(res))
        ),
    )
)


# 2. tensor-parallel blocks
def _tp_measure(mod, r: Runner, cfg: dict) -> dict:
    x = mod.batch(0)
    result = r.wait(r.submit(x))
    for _ in range(cfg["warmup"]):
        r.wait(r.submit(x))
    n = cfg["tp_n"]
    t0 = time.perf_counter()
    for _ in range(n):
        r.wait(r.submit(x))
    return {"steps": n / (time.perf_counter() - t0), "result": result}


register(
    Workload(
        name="tensor_parallel",
        title="tensor-parallel transformer blocks (2 shards, 2 blocks)",
        example="tensor_parallel",
        make_actors=lambda m: m.make_shards(m.SHARDS),
        build=lambda m, actors, t: m.build_dag(actors, None if t == "nccl" else t),
        measure=_tp_measure,
        metrics=(("steps", "steps/s (forward, one at a time)", "/s", "higher"),),
        check=lambda m, res: all(_close(o, m.reference(m.batch(0)), 1e-4) for o in res),
    )
)


# 3. heterogeneous training
def _reset(actors: list) -> None:
    import ray

    ray.get([a.reset.remote() for a in actors])


def _hetero_measure(mod, r: Runner, cfg: dict) -> dict:
    losses = []
    for k in range(cfg["warmup_train"]):
        losses.append(r.wait(r.submit(*mod.batch(k))))
    n = cfg["train_n"]
    t0 = time.perf_counter()
    for k in range(cfg["warmup_train"], cfg["warmup_train"] + n):
        losses.append(r.wait(r.submit(*mod.batch(k))))
    return {"its": n / (time.perf_counter() - t0), "result": losses}


register(
    Workload(
        name="hetero_training",
        title="heterogeneous training (text tower + CNN, 2 actors)",
        example="hetero_training",
        make_actors=lambda m: m.make_actors(),
        build=lambda m, actors, t: m.build_dag(actors, t),
        measure=_hetero_measure,
        reset=_reset,
        metrics=(("its", "iterations/s", "/s", "higher"),),
        check=lambda m, res: _close([tuple(x) for x in res], m.reference(len(res)), 1e-4),
    )
)


# 4. serving graph under concurrent clients
def _serving_measure(mod, r: Runner, cfg: dict) -> dict:
    first = [r.call(mod.request(i)) for i in range(5)]
    mod.load(r.call, cfg["clients"], per_client=cfg["warmup_requests"])
    m = mod.load(
        r.call,
        cfg["clients"],
        per_client=cfg["requests"],
        check=lambda req, ans: ans["id"] == req["id"],
    )
    if m["wrong"]:
        raise AssertionError(f"{m['wrong']} answers went to the wrong request")
    return {"p50": m["p50_ms"], "p99": m["p99_ms"], "rps": m["requests_per_s"], "result": first}


register(
    Workload(
        name="serving",
        title="serving graph (2 preprocessors -> model -> postprocess), 4 client threads",
        example="serving",
        make_actors=lambda m: m.make_actors(),
        build=lambda m, actors, t: m.build_dag(actors),
        measure=_serving_measure,
        options={"ray": {"enable_asyncio": True}},
        metrics=(
            ("p50", "latency p50 under load", "ms", "lower"),
            ("p99", "latency p99 under load", "ms", "lower"),
            ("rps", "requests/s", "/s", "higher"),
        ),
        check=lambda m, res: all(
            m.same_answer(a, m.reference(m.request(i))) for i, a in enumerate(res)
        ),
    )
)


# 5. pipeline training with a generated 1F1B schedule
def _pt_measure(mod, r: Runner, cfg: dict) -> dict:
    from dagc.pipelining import microbatch_args

    out = []
    m = mod.MICROBATCHES
    for k in range(cfg["warmup_train"]):
        out.append(r.wait(r.submit(*microbatch_args(*mod.batch(k), m))))
    n = cfg["train_n"]
    t0 = time.perf_counter()
    for k in range(cfg["warmup_train"], cfg["warmup_train"] + n):
        out.append(r.wait(r.submit(*microbatch_args(*mod.batch(k), m))))
    return {"its": n / (time.perf_counter() - t0), "result": out}


def _pt_check(mod, res) -> bool:
    m = mod.MICROBATCHES
    want = mod.reference(len(res), mod.STAGES, m)
    return _close(
        [list(x[:m]) + list(x[m:]) for x in res],
        [list(losses) + list(norms) for losses, norms in want],
        1e-4,
    )


register(
    Workload(
        name="pipeline_training",
        title="pipeline training, generated 1F1B (2 stages, 4 microbatches)",
        example="pipeline_training",
        make_actors=lambda m: m.make_stages(m.STAGES, m.MICROBATCHES),
        build=lambda m, actors, t: m.build(actors, m.MICROBATCHES, "1f1b", transport=t),
        measure=_pt_measure,
        reset=_reset,
        metrics=(("its", "training steps/s", "/s", "higher"),),
        check=_pt_check,
    )
)


# -- running -----------------------------------------------------------------------------------
QUICK = {
    "rounds": 3,
    "torch_threads": 1,
    "warmup": 5,
    "pp_n": 30,
    "tp_n": 40,
    "warmup_train": 3,
    "train_n": 15,
    "clients": 4,
    "warmup_requests": 5,
    "requests": 40,
    "predict": 10,
    "order_n": 40,
}
FULL = {
    **QUICK,
    "rounds": 5,
    "warmup": 20,
    "pp_n": 200,
    "tp_n": 300,
    "warmup_train": 5,
    "train_n": 60,
    "warmup_requests": 20,
    "requests": 250,
    "predict": 20,
    "order_n": 100,
}


def run_workload(w: Workload, cfg: dict, systems, log) -> dict:
    import torch

    mod = load_example(w.example)
    actors = w.make_actors(mod)
    prepare_actors(actors)
    threads = cfg["torch_threads"]
    if threads:  # one torch thread per actor: a few actors + the driver share few cores
        import ray

        ray.get(
            [a.__ray_call__.remote(lambda self: torch.set_num_threads(threads)) for a in actors]
        )
    pids = actor_pids(actors)
    rt = ray_transport(actors)
    rounds: dict[str, list[dict]] = {s: [] for s in systems}
    first_result = None
    for rnd in range(cfg["rounds"]):
        for system in systems:
            res: dict = {"round": rnd}
            try:
                if w.reset:
                    w.reset(actors)
                res["start_cpu"] = wait_idle(pids)
                dag = w.build(mod, actors, rt if system == "ray" else "nccl")
                t0 = time.perf_counter()
                r = Runner(system, dag, w.options.get(system, {}))
                if system != "plain":  # plain Ray compiles nothing
                    res["compile_s"] = time.perf_counter() - t0
                try:
                    res.update(w.measure(mod, r, cfg))
                finally:
                    r.teardown()
                result = res.pop("result")
                if first_result is None:
                    first_result = result
                    res["matches_reference"] = bool(w.check(mod, result)) if w.check else None
                res["same_as_first"] = _close(result, first_result)
            except Exception as e:  # one failed round must not lose the others
                res["error"] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc(limit=8))
            rounds[system].append(res)
            shown = ", ".join(f"{k} {res[k]:.4g}" for k, *_ in w.metrics[:3] if k in res)
            log(
                f"  {w.name} round {rnd} {system:5}: {shown or res.get('error')}"
                + ("" if res.get("same_as_first", True) else "  RESULTS DIFFER")
            )
    predicted = None
    if cfg.get("predict") and "dagc" in systems:
        try:
            if w.reset:
                w.reset(actors)
            predicted = predict_vs_measured(
                w.build(mod, actors, "nccl"), mod.example_input(), cfg["predict"]
            )
            log(
                f"  {w.name} makespan: predicted {predicted['predicted_us'] / 1e3:.2f} ms, "
                f"measured {predicted['measured_us'] / 1e3:.2f} ms "
                f"({predicted['error']:+.0%})"
            )
        except Exception as e:  # noqa: BLE001 - reported, the rounds stand
            predicted = {"error_text": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc(limit=8))
    import ray

    for a in actors:
        ray.kill(a)
    out = summarize(w, rounds)
    out["makespan"] = predicted
    return out


# -- the scheduler: predicted vs measured, and the opt-in reorder ------------------------------
def predict_vs_measured(dag, args: tuple, n: int, methods=None, **options) -> dict:
    """Compile, profile ``n`` executions for costs; compile again with ``costs=`` that
    profile and profile ``n`` more: the simulator's predicted makespan vs the measured one
    (median execution, driver's input write to its last output read, µs), and the bubble
    of the ``methods`` calls (all calls: None) predicted and measured."""
    import dagc
    from dagc.schedule.costs import bubble as bubble_of
    from dagc.schedule.costs import makespan

    with dagc.compile(dag, **options) as cg:
        for _ in range(3):
            cg.execute(*args).get(timeout=GET_TIMEOUT_S)
        prof = cg.profile(n, *args)
    with dagc.compile(dag, costs=prof, **options) as cg:
        cg.execute(*args).get(timeout=GET_TIMEOUT_S)
        cg.profile(n, *args)
        s = cg.schedule
        t = s.timing
        pm, mm = makespan(s, t.predicted), makespan(s, t.measured)
        return {
            "predicted_us": pm,
            "measured_us": mm,
            "error": (pm - mm) / mm,
            "bubble_predicted": bubble_of(s, t.predicted, methods),
            "bubble_measured": bubble_of(s, t.measured, methods),
            "schedule": str(s),
        }


def _order_node():
    import ray

    import dagc

    @ray.remote
    class OrderNode:
        """The DAG where one actor's order matters: ``fast`` is a local result for the
        driver, ``feed`` the input of another actor's ``slow``. Sleeps stand in for work
        (they do not compete for the machine's two cores)."""

        @dagc.reorderable
        def fast(self, x):
            time.sleep(0.005)
            return x + 1

        @dagc.reorderable
        def feed(self, x):
            time.sleep(0.001)
            return x * 2

        def slow(self, x):
            time.sleep(0.020)
            return x - 1

    return OrderNode


def reorder_gain(cfg: dict, log) -> dict:
    """Latency of the order-matters DAG, bind order vs ``reorder="critical-path"`` (costs from
    a profile), alternating rounds; and each one's predicted vs measured makespan."""
    import ray

    import dagc
    from dagc import InputNode, MultiOutputNode

    node = _order_node()
    a, b = node.remote(), node.remote()
    ray.get([a.fast.remote(0), b.slow.remote(0)])
    with InputNode() as inp:  # bound: fast first, then the feed of the slow consumer
        dag = MultiOutputNode([a.fast.bind(inp), b.slow.bind(a.feed.bind(inp))])
    with dagc.compile(dag) as cg:
        for _ in range(5):
            cg.execute(1).get(timeout=GET_TIMEOUT_S)
        prof = cg.profile(cfg["order_n"] // 2, 1)
    out = {"bind": [], "critical-path": []}
    for rnd in range(cfg["rounds"]):
        for label, opts in (("bind", {}), ("critical-path", {"reorder": "critical-path"})):
            with dagc.compile(dag, costs=prof, **opts) as cg:
                for _ in range(5):
                    cg.execute(1).get(timeout=GET_TIMEOUT_S)
                lat = []
                for _ in range(cfg["order_n"]):
                    t0 = time.perf_counter()
                    assert cg.execute(1).get(timeout=GET_TIMEOUT_S) == [2, 1]
                    lat.append((time.perf_counter() - t0) * 1e3)
                out[label].append(_pct(lat, 0.5))
                log(f"  order-matters round {rnd} {label:13}: p50 {out[label][-1]:.2f} ms")
    res = {k: statistics.median(v) for k, v in out.items()}
    res["gain"] = 1 - res["critical-path"] / res["bind"]
    for label, opts in (("bind", {}), ("critical-path", {"reorder": "critical-path"})):
        pv = predict_vs_measured(dag, (1,), cfg["order_n"] // 2, **opts)
        res[f"{label}_predicted_us"] = pv["predicted_us"]
        res[f"{label}_measured_us"] = pv["measured_us"]
        res[f"{label}_error"] = pv["error"]
        log(
            f"  order-matters {label:13}: makespan predicted {pv['predicted_us'] / 1e3:.2f} ms, "
            f"measured {pv['measured_us'] / 1e3:.2f} ms ({pv['error']:+.0%})"
        )
    for x in (a, b):
        ray.kill(x)
    return res


def summarize(w: Workload, rounds: dict) -> dict:
    out = {"name": w.name, "title": w.title, "rounds": rounds, "metrics": []}
    med = {}
    for s, rs in rounds.items():
        ok = [r for r in rs if "error" not in r]
        med[s] = {
            k: statistics.median(r[k] for r in ok)
            for k, *_ in w.metrics
            if ok and all(k in r for r in ok)
        }
        cs = [r["compile_s"] for r in ok if "compile_s" in r]
        med[s]["compile_s"] = statistics.median(cs) if cs else None
    for key, label, unit, better in (*w.metrics, ("compile_s", "compile", "s", "lower")):
        row = {
            "key": key,
            "label": label,
            "unit": unit,
            "better": better,
            **{s: med[s].get(key) for s in rounds},
        }
        d = row.get("dagc")
        for s in ("ray", "plain"):
            v = row.get(s)
            row[f"dagc/{s}"] = d / v if d is not None and v else None
        out["metrics"].append(row)
    all_rounds = [r for rs in rounds.values() for r in rs]
    out["equal_results"] = all(
        r.get("same_as_first", False) for r in all_rounds if "error" not in r
    )
    out["matches_reference"] = next(
        (r["matches_reference"] for r in all_rounds if r.get("matches_reference") is not None), None
    )
    out["errors"] = [
        f"{s} round {r['round']}: {r['error']}"
        for s, rs in rounds.items()
        for r in rs
        if "error" in r
    ]
    return out


def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:,.2f} ms"
    if unit == "s":
        return f"{v * 1e3:,.0f} ms"
    return f"{v:,.1f} {unit}"


def table(results: list[dict]) -> str:
    head = (
        f"{'metric':34} {'Ray CG':>12} {'dagc':>12} {'plain Ray':>12} "
        f"{'dagc/Ray':>9} {'dagc/plain':>10}"
    )
    lines = []
    for c in results:
        lines += ["", f"{c['name']}: {c['title']}", head, "-" * len(head)]
        for m in c["metrics"]:
            r = lambda k, m=m: f"{m[k]:.3f}" if m.get(k) is not None else "-"
            lines.append(
                f"{m['label'][:34]:34} {fmt(m.get('ray'), m['unit']):>12} "
                f"{fmt(m.get('dagc'), m['unit']):>12} "
                f"{fmt(m.get('plain'), m['unit']):>12} {r('dagc/ray'):>9} "
                f"{r('dagc/plain'):>10}"
            )
        lines.append(
            f"results equal across systems: {'yes' if c['equal_results'] else 'NO'}; "
            f"match the single-process reference: "
            f"{ {True: 'yes', False: 'NO', None: '?'}[c['matches_reference']] }"
        )
        for e in c["errors"][:3]:
            lines.append(f"  error: {e[:150]}")
    return "\n".join(lines)


# -- the pipeline bubble -----------------------------------------------------------------------
def bubble(configs, emulate_ms: float, executions: int, log) -> list[dict]:
    """Measured vs theoretical bubble of the generated schedules, stage time emulated by
    sleeping (forward ``emulate_ms``, backward twice that): a stand-in for accelerator time,
    which does not occupy the CPU, so a small CPU machine shows the schedule, not its cores.
    Measured twice: from ``cg.profile(n)`` (dagc.pipelining.measured_bubble), and from the
    stage actors' own clocks; and predicted: the simulator's bubble from the profile's costs
    (compiled again with ``costs=`` the profile; its own profile is the "measured" beside
    it: makespans of the driver's view, µs)."""
    import ray

    import dagc
    from dagc.pipelining import (
        bubble_fraction,
        measured_bubble,
        microbatch_args,
        theoretical_bubble,
    )

    mod = load_example("pipeline_training")
    out = []
    for p, m, schedule, overlap in configs:
        stages = mod.make_stages(p, m, emulate_ms)
        args = microbatch_args(*mod.batch(0), m)
        row = {
            "stages": p,
            "microbatches": m,
            "schedule": schedule,
            "overlap": overlap,
            "theory": theoretical_bubble(p, m),
            "emulate_ms": emulate_ms,
        }
        try:
            with dagc.compile(mod.build(stages, m, schedule), overlap_communication=overlap) as cg:
                for _ in range(2):
                    cg.execute(*args).get(timeout=GET_TIMEOUT_S)
                ray.get([s.timings.remote() for s in stages])
                for _ in range(executions):
                    cg.execute(*args).get(timeout=GET_TIMEOUT_S)
                spans = [x for s in stages for x in ray.get(s.timings.remote())]
                row["stage_clock"] = bubble_fraction(spans, p)["bubble"]
                prof = cg.profile(executions, *args)
                row["profile"] = measured_bubble(prof, p)["bubble"]
            pv = predict_vs_measured(
                mod.build(stages, m, schedule),
                args,
                executions,
                ("forward", "backward"),
                overlap_communication=overlap,
            )
            row["predicted"] = pv["bubble_predicted"]
            row.update(
                makespan_predicted_us=pv["predicted_us"],
                makespan_measured_us=pv["measured_us"],
                makespan_error=pv["error"],
            )
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        for s in stages:
            ray.kill(s)
        log(
            f"  P={p} M={m} {schedule:5} overlap={overlap!s:5}: theory {row['theory']:.3f}, "
            f"predicted {row.get('predicted', float('nan')):.3f}, "
            f"measured {row.get('profile', float('nan')):.3f} (profile), "
            f"{row.get('stage_clock', float('nan')):.3f} (stage clocks); makespan "
            f"{row.get('makespan_error', float('nan')):+.0%} predicted vs measured"
            + (f"  error: {row['error']}" if "error" in row else "")
        )
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="dagc vs Ray CG vs plain Ray on the workloads "
        "of examples/ (see benchmarks/README.md)"
    )
    ap.add_argument("--quick", action="store_true", help="3 rounds, few samples")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--cases", default="all", help=f"comma-separated: {','.join(WORKLOADS)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--bubble", action="store_true", help="only the pipeline-bubble check")
    ap.add_argument("--no-bubble", action="store_true", help="skip the pipeline-bubble check")
    ap.add_argument(
        "--scheduler",
        action="store_true",
        help="only the scheduler's checks: the order-matters DAG (bind order vs "
        "reorder='critical-path') and predicted vs measured makespans",
    )
    ap.add_argument(
        "--no-predict", action="store_true", help="skip predicted vs measured makespan per workload"
    )
    ap.add_argument(
        "--emulate-ms",
        type=float,
        default=20.0,
        help="bubble check: emulated forward time per stage (backward 2x)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads per actor (default 1; 0: torch's default)",
    )
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.rounds:
        cfg["rounds"] = a.rounds
    cfg["torch_threads"] = a.torch_threads
    if a.no_predict:
        cfg["predict"] = 0
    names = list(WORKLOADS) if a.cases == "all" else a.cases.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {', '.join(WORKLOADS)}")
    systems = tuple(a.systems.split(","))

    import ray

    log = lambda s: print(s, file=sys.stderr, flush=True)
    started = time.time()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    results, bubbles, order = [], [], None
    try:
        if a.scheduler:
            systems = ("dagc",)
            cfg["rounds"] = min(cfg["rounds"], 3)
        if not a.bubble:
            for n in names:
                log(f"{n}:")
                if a.scheduler:  # no rounds: the prediction check only
                    results.append(run_workload(WORKLOADS[n], {**cfg, "rounds": 0}, systems, log))
                else:
                    results.append(run_workload(WORKLOADS[n], cfg, systems, log))
            log("order-matters DAG:")
            try:
                order = reorder_gain(cfg, log)
            except Exception:  # noqa: BLE001 - the other figures stand
                log(traceback.format_exc(limit=8))
        if a.bubble or not (a.no_bubble or a.scheduler):
            log("pipeline bubble:")
            configs = [
                (2, 4, "gpipe", False),
                (2, 4, "1f1b", False),
                (2, 4, "1f1b", True),
                (4, 8, "gpipe", False),
                (4, 8, "1f1b", False),
                (4, 8, "1f1b", True),
            ]
            bubbles = bubble(configs, a.emulate_ms, 5 if a.quick else 20, log)
    finally:
        ray.shutdown()
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f}; "
        f"{cfg['rounds']} rounds per system, alternating; {time.time() - started:.0f} s"
    )
    if not a.scheduler:
        print(table(results))
    made = [(c["name"], c.get("makespan")) for c in results if c.get("makespan")]
    if made:
        print(
            "\nmakespan of one execution, predicted from a profile's costs vs measured "
            "(median of the next profile; driver's input write to its last output read)"
        )
        print(f"{'workload':18} {'predicted':>11} {'measured':>11} {'error':>7}")
        for name, mk in made:
            if "error_text" in mk:
                print(f"{name:18} {mk['error_text'][:80]}")
                continue
            print(
                f"{name:18} {mk['predicted_us'] / 1e3:>8.2f} ms {mk['measured_us'] / 1e3:>8.2f} ms "
                f"{mk['error']:>+7.0%}"
            )
    if order:
        print(
            f"\norder-matters DAG (a0: fast 5 ms local result, bound first; feed 1 ms -> "
            f"a1: slow 20 ms), latency p50, median of {cfg['rounds']} rounds:"
        )
        print(
            f"  bind order {order['bind']:.2f} ms, reorder='critical-path' "
            f"{order['critical-path']:.2f} ms: {order['gain']:.0%} lower"
        )
        for k in ("bind", "critical-path"):
            print(
                f"  {k:13} makespan predicted {order[k + '_predicted_us'] / 1e3:.2f} ms, "
                f"measured {order[k + '_measured_us'] / 1e3:.2f} ms "
                f"({order[k + '_error']:+.0%})"
            )
    if bubbles:
        print(
            "\npipeline bubble (emulated stage time: forward "
            f"{a.emulate_ms:g} ms, backward {2 * a.emulate_ms:g} ms)"
        )
        print(
            f"{'P':>2} {'M':>2} {'schedule':8} {'overlap':7} {'theory':>7} {'predicted':>9} "
            f"{'profile':>8} {'stage clocks':>12} {'makespan pred/meas':>19}"
        )
        for b in bubbles:
            f = lambda k, b=b: f"{b[k]:.3f}" if k in b else "-"
            mk = (
                (
                    f"{b['makespan_predicted_us'] / 1e3:.0f}/{b['makespan_measured_us'] / 1e3:.0f}"
                    f" ms {b['makespan_error']:+.0%}"
                )
                if "makespan_error" in b
                else "-"
            )
            print(
                f"{b['stages']:>2} {b['microbatches']:>2} {b['schedule']:8} "
                f"{str(b['overlap']):7} {b['theory']:7.3f} {f('predicted'):>9} "
                f"{f('profile'):>8} {f('stage_clock'):>12} {mk:>19}"
                + (f"  {b['error'][:80]}" if "error" in b else "")
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "config": cfg,
                    "loadavg": load,
                    "workloads": results,
                    "bubble": bubbles,
                    "order_matters": order,
                },
                f,
                indent=1,
                default=str,
            )
    bad = [c["name"] for c in results if not c["equal_results"] or c["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

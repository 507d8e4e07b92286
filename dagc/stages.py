"""The stages of a compile, named as JAX's AOT API names them: trace, lower, load.

    traced = dagc.trace(dag)                  # Traced: the DAG as dagc IR; nothing sent anywhere
    lowered = traced.lower(max_inflight=4)    # Lowered: schedule and generated modules;
                                              #   no actor touched, no channel made
    print(lowered.as_text())                  # the Step x Actor table
    cg = lowered.load()                       # CompiledDag: loops running on the actors

``dagc.compile(dag, **options)`` is the three in a row: it asks the actors where they run
first (:func:`probe`) and lowers once, with that placement. A
:class:`~dagc.placement.Placement` can also be written by hand to see how a DAG would
compile elsewhere ("what if on 2 nodes?")::

    traced.lower(placement=Placement.spread(traced.actor_ids, nodes=2)).as_text()

What these objects print is for reading, not a save format (``Schedule.to_json`` is one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from dagc.errors import CompileError
from dagc.options import check_options
from dagc.placement import ActorPlace, Placement

if TYPE_CHECKING:  # annotations only: the stages import these late, when first used
    from ray.actor import ActorHandle
    from ray.dag import DAGNode

    from dagc.codegen.render import GeneratedModule
    from dagc.ir import IR, SideTable
    from dagc.runtime.actor.lifecycle import Probe
    from dagc.runtime.driver.compiled import CompiledDag
    from dagc.schedule import Schedule


def trace(dag: DAGNode) -> Traced:
    """Walk a Ray DAG into dagc's IR. Touches no actor; raises CompileError naming an
    unsupported node."""
    from dagc import frontend

    origin = _origin()
    ir, side = frontend.walk(dag)
    _check_communicators(ir, side)
    return Traced(ir, side, origin)


def _check_communicators(ir: IR, side: SideTable) -> None:
    """A communicator object in the DAG (``with_tensor_transport(transport=obj)``, a
    collective's ``transport=``) must be a dagc.Communicator or a Ray Communicator; a Ray
    one is wrapped in an adapter (``dagc.runtime.comm.ray_adapter``)."""
    if not side.communicators:
        return
    from dagc.runtime.comm.ray_adopt import adopt

    adopt(ir, side)


class Traced:
    """A Ray DAG as dagc IR: ``ir`` (plain data: ops, actors "a0", "a1", ..., values "t0",
    ...) and ``side`` (the live objects it names: actor handles, constants, communicators).
    """

    def __init__(self, ir: IR, side: SideTable, origin: str = "<unknown>"):
        self.ir = ir
        self.side = side
        self.origin = origin  # the user's file, named in generated modules

    @property
    def actor_ids(self) -> tuple[str, ...]:
        """The DAG's actors as the IR names them ("a0", "a1", ...), in order."""
        return tuple(a.id for a in self.ir.actors)

    def as_text(self) -> str:
        """The IR, one op a line (``t3 = a1.fwd(t2, #0, k=$1)``)."""
        return str(self.ir)

    def lower(self, placement: Placement | None = None, **options: Any) -> Lowered:
        """Run the compiler passes and generate the modules, for ``placement`` (where the
        actors run; None: all of them on the driver's node, without GPUs). ``options`` are
        ``dagc.compile``'s. Touches no actor and makes no channel."""
        opts = check_options(options)
        return _lower(self, placement if placement is not None else Placement.local(), opts)

    def __repr__(self) -> str:
        return f"<dagc.Traced {len(self.ir.actors)} actors, {len(self.ir.ops())} ops>"


class Lowered:
    """A DAG lowered for one placement: its schedule and generated modules (``modules``, by
    actor id and "driver"). Nothing has been sent to any actor."""

    def __init__(
        self,
        traced: Traced,
        ir: IR,
        modules: dict[str, GeneratedModule],
        placement: Placement,
        options: dict[str, Any],
        timings: dict[str, float],
    ):
        self.traced = traced
        self.ir = ir
        self.modules = modules
        self.placement = placement
        self.options = options
        self.timings = timings

    @property
    def schedule(self) -> Schedule:
        """The :class:`dagc.Schedule`: what each process does at each step."""
        return self.ir.schedule

    def sources(self) -> dict[str, str]:
        """The generated modules' text, by actor id (and "driver")."""
        return {a: m.source for a, m in self.modules.items()}

    def source(self, actor: ActorHandle | str) -> str:
        """The generated module of ``actor`` (an ActorHandle or its schedule name)."""
        from dagc.runtime.driver.compiled import resolve_actor

        return self.modules[resolve_actor(self.ir, self.traced.side.handles, actor)].source

    def as_text(self) -> str:
        """The schedule: the Step x Actor table, with its calls and channels."""
        return str(self.ir.schedule)

    def visualize(self, format: Literal["ascii", "dot", "svg", "png"] = "ascii") -> str | bytes:
        """The dataflow graph: "ascii" (always), "dot", "svg" or "png" (need Graphviz)."""
        from dagc.inspect.graph import render

        return render(self.ir.schedule, format)

    def dump(self, directory: str | os.PathLike) -> None:
        """Write the generated modules, schedule.{txt,json,csv} and graph.dot."""
        from dagc.inspect.artifacts import write_artifacts

        write_artifacts(directory, self.ir.schedule, self.sources(), None)

    def load(self) -> CompiledDag:
        """Start the loops: returns a running :class:`dagc.CompiledDag`.

        Asks each actor where it runs (one call each). If that differs from the placement
        this was lowered with - always so for a Lowered made without one, which also lacks
        where the methods are defined - it lowers again with the real placement first (this
        object stays as it is); then it opens the channels and starts the loops.
        """
        _require_ray()
        t0 = time.perf_counter()
        timeout = self.options["start_timeout"]
        side = _create_function_actors(self.traced, timeout)
        with _owning(side):
            probes, placement = probe(self.traced, timeout, side)
            same = _same(
                _function_places(self.traced, placement),
                _function_places(self.traced, self.placement),
                self.traced.actor_ids,
            )
            lowered = self if same else _lower(self.traced, placement, self.options)
            return lowered._start(probes, t0, side=side)

    def _start(
        self,
        probes: dict[str, Probe],
        t_start: float,
        cls: type[CompiledDag] | None = None,
        side: SideTable | None = None,
    ) -> CompiledDag:
        """Load onto actors whose probe results are ``probes`` (this Lowered's placement).
        ``cls``: the CompiledDag class to make (dagc.ray_graph's subclass, under the patch);
        ``side``: the live objects, function actors created (the traced side table's if
        there are none)."""
        from dagc.runtime.driver.compiled import CompiledDag

        make = CompiledDag if cls is None else cls
        timings = dict(self.timings)
        t0 = time.perf_counter()
        cg = make(
            self.ir,
            side if side is not None else self.traced.side,
            self.modules,
            self.options,
            probes,
            timings=timings,
            driver_node=self.placement.driver_node,
            profile_sources=self._profile_sources,
        )
        timings["start"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        if self.options["output_dir"]:
            cg.dump(self.options["output_dir"])
        return cg

    def _profile_sources(self) -> list[str]:
        """The profiling variant of every actor's module (timing calls compiled in)."""
        from dagc.codegen import render_actor

        return [
            render_actor(self.ir, self.ir.schedule, a.id, self.traced.origin, profile=True).source
            for a in self.ir.actors
        ]

    def _repr_html_(self) -> str:
        from dagc.inspect.html import compiled_html

        return compiled_html(self.ir.schedule, self.sources())

    def __repr__(self) -> str:
        return (
            f"<dagc.Lowered {len(self.ir.actors)} actors, {len(self.ir.channels)} "
            f"channels, {self.ir.schedule.num_steps} steps>"
        )


def compile(dag: DAGNode, **options: Any) -> CompiledDag:
    """Compile a Ray DAG into generated actor loops and start them: :func:`trace`, then
    :func:`probe` the actors, then lower once with their placement, then load. Returns a
    running CompiledDag."""
    return compile_as(None, dag, options)


def compile_as(
    cls: type[CompiledDag] | None,
    dag: DAGNode,
    options: dict[str, Any],
    check: Callable[[Traced], None] | None = None,
) -> CompiledDag:
    """:func:`compile`, making a ``cls`` (a CompiledDag subclass; None: CompiledDag).
    ``check(traced)`` may refuse the traced DAG before any actor is asked anything."""
    t_start = time.perf_counter()
    opts = check_options(options)
    _require_ray()
    traced = trace(dag)
    if check is not None:
        check(traced)
    side = _create_function_actors(traced, opts["start_timeout"])
    with _owning(side):
        probes, placement = probe(traced, opts["start_timeout"], side)
        return _lower(traced, placement, opts)._start(probes, t_start, cls, side)


def probe(
    traced: Traced, timeout: float = 120.0, side: SideTable | None = None
) -> tuple[dict[str, Probe], Placement]:
    """Ask each actor of ``traced`` where it runs (one read-only call each; no loop
    started, no channel made). Returns ({actor id: runtime probe}, Placement). An actor
    already running another compiled DAG is a CompileError.

    ``side``: the live objects to ask (the traced side table's by default). A function
    actor not created yet (``dagc compile --lower-only``) is not asked: it is taken to run
    on the driver's node with the GPUs its ``num_gpus`` asks for."""
    import ray

    from dagc.frontend.functions import is_function_actor
    from dagc.ir import CALL
    from dagc.runtime.driver.calls import probe_actors

    side = traced.side if side is None else side
    methods: dict[str, set[str]] = {}
    for op in traced.ir.ops():
        if op.kind == CALL:
            methods.setdefault(op.actor, set()).add(op.method)
    live = {a: h for a, h in side.handles.items() if not is_function_actor(h)}
    probes = probe_actors(live, {a: sorted(m) for a, m in methods.items()}, timeout)
    driver_node = ray.get_runtime_context().get_node_id()
    places = {a: p.place for a, p in probes.items()}
    for a, spec in side.handles.items():
        if is_function_actor(spec):
            gpus = math.ceil(spec.task_options.get("num_gpus") or 0)
            places[a] = ActorPlace(node=driver_node, gpus=tuple(range(gpus)))
    placement = _function_places(traced, Placement(driver_node=driver_node, actors=places))
    for a in _function_actors(traced):
        if a in probes:  # created: its probe tells the function's place, as for methods
            probes[a] = dataclasses.replace(probes[a], place=placement.of(a))
    return probes, placement


def _function_actors(traced: Traced) -> dict[str, Any]:
    """{actor id: FunctionActor} of the DAG's function nodes (frontend/functions.py)."""
    from dagc.frontend.functions import is_function_actor

    return {a: h for a, h in traced.side.handles.items() if is_function_actor(h)}


def _function_places(traced: Traced, placement: Placement) -> Placement:
    """``placement`` with each function actor's function located (``file:line name``), as
    the probe locates methods: the driver knows where the function is written."""
    fns = _function_actors(traced)
    if not fns:
        return placement
    actors = dict(placement.actors)
    for a, spec in fns.items():
        place = placement.of(a)
        if spec.where and not place.methods:
            actors[a] = dataclasses.replace(place, methods={spec.method: spec.where})
    return dataclasses.replace(placement, actors=actors)


def _create_function_actors(traced: Traced, timeout: float) -> SideTable:
    """The side table to load with: the traced one, or, when the DAG has function nodes,
    one holding the actors created for them and owning them (runtime/actor/
    function_host.py). The traced DAG itself is left as it is: each load owns its own."""
    fns = _function_actors(traced)
    if not fns:
        return traced.side
    from dagc.runtime.actor import function_host

    return function_host.owning(traced.side, function_host.create(fns, timeout))


@contextlib.contextmanager
def _owning(side: SideTable) -> Iterator[None]:
    """Kill the actors ``side`` owns if the compile fails before a CompiledDag owns them
    (once it does, a failed start releases them itself; twice is harmless)."""
    try:
        yield
    except BaseException:
        from dagc.runtime.actor import function_host

        function_host.release(side)
        raise


def _lower(traced: Traced, placement: Placement, opts: dict[str, Any]) -> Lowered:
    from dagc.codegen import render_all
    from dagc.options import passes_for
    from dagc.passes import PassContext, run_passes

    ir = traced.ir  # the options that change the output are the passes' fields
    ctx = PassContext(placement=_function_places(traced, placement), costs=opts["costs"])
    t0 = time.perf_counter()
    ir = run_passes(ir, passes_for(opts), ctx)
    ctx.timings["passes"] = time.perf_counter() - t0
    _check_devices(ir)
    t0 = time.perf_counter()
    modules = render_all(ir, traced.origin)
    ctx.timings["codegen"] = time.perf_counter() - t0
    return Lowered(traced, ir, modules, placement, opts, ctx.timings)


def _check_devices(ir: IR) -> None:
    """``with_tensor_transport(device="cuda")``: every actor that reads the value must hold
    a GPU where it runs (the driver's GPU is checked when it reads)."""
    from dagc.ir import DRIVER

    for c in ir.channels:
        if c.value.op not in ir.graph:
            continue
        op = ir.op(c.value.op)
        if op.device != "cuda":
            continue
        for r in c.readers:
            if r != DRIVER and not ir.actor(r).gpu_ids:
                a = ir.actor(r)
                raise CompileError(
                    f"{op.id} = {op.actor}.{op.method}(...) is sent with "
                    f"with_tensor_transport(device='cuda'), but its reader {a.label} holds no "
                    f"GPU: give that actor a GPU (num_gpus=1), or use device='default' (the "
                    f"transport's device) or device='cpu'."
                )


def _same(a: Placement, b: Placement, actor_ids: tuple[str, ...]) -> bool:
    """Whether lowering would see the same facts in ``a`` and ``b``."""
    return a.driver_node == b.driver_node and all(a.of(x) == b.of(x) for x in actor_ids)


def _require_ray() -> None:
    import ray

    if not ray.is_initialized():
        raise CompileError(
            "Ray is not initialised; call ray.init() (or create the actors) before dagc.compile()."
        )


def _origin() -> str:
    """The user's file that called into dagc, relative to the working directory."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        fn = frame.f_code.co_filename
        if "dagc" + os.sep not in fn or os.sep + "examples" + os.sep in fn:
            try:
                return os.path.relpath(fn)
            except ValueError:
                return fn
        frame = frame.f_back
    return "<unknown>"

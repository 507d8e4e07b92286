"""The stages of a compile, named as JAX's AOT API names them: trace, lower, load.

    traced = dagc.trace(dag)                  # Traced: the DAG as dagc IR; nothing sent anywhere
    lowered = traced.lower(max_inflight=4)    # Lowered: schedule and generated modules;
                                              #   no actor touched, no channel made
    print(lowered.as_text())                  # the Step x Actor table
    cg = lowered.load()                       # CompiledDag: loops running on the actors

``dagc.compile(dag, **options)`` is the three in a row: it asks the actors where they run
first (:func:`probe`) and lowers once, with that placement. A :class:`~dagc.placement.Placement` can also be
written by hand to see how a DAG would compile elsewhere ("what if on 2 nodes?")::

    traced.lower(placement=Placement.spread(traced.actor_ids, nodes=2)).as_text()

What these objects print is for reading, not a save format (``Schedule.to_json`` is one).
"""
from __future__ import annotations

import os
import sys
import time

from dagc.errors import CompileError
from dagc.options import check_options
from dagc.placement import Placement


def trace(dag) -> "Traced":
    """Walk a Ray DAG into dagc's IR. Touches no actor; raises CompileError naming an
    unsupported node."""
    from dagc import frontend
    origin = _origin()
    ir, side = frontend.trace(dag)
    _check_communicators(ir, side)
    return Traced(ir, side, origin)


def _check_communicators(ir, side) -> None:
    """A communicator object in the DAG (``with_tensor_transport(transport=obj)``, a
    collective's ``transport=``) must be a dagc.Communicator: Ray's cannot drive dagc's ops."""
    if not side.communicators:
        return
    from dagc.runtime.comm.base import Communicator
    for name, comm in side.communicators.items():
        if isinstance(comm, Communicator):
            continue
        users = [f"{op.id} = {op.actor}.{op.method}(...)" for op in ir.ops()
                 if op.transport == name]
        raise CompileError(
            f"{', '.join(users) or 'a node'}: its transport is a {type(comm).__name__}, not a "
            f"dagc.Communicator; a Ray Communicator cannot drive dagc's communicator ops. Use "
            f"with_tensor_transport(transport='auto') (or 'nccl') and give dagc the "
            f"communicator: dagc.compile(dag, communicator=<a dagc.Communicator>), or under "
            f"dagc.patch_ray() experimental_compile(_default_communicator=<a "
            f"dagc.Communicator>) (dagc.GlooCommunicator, dagc.NcclCommunicator or a "
            f"subclass).")


class Traced:
    """A Ray DAG as dagc IR: ``ir`` (plain data: ops, actors "a0", "a1", ..., values "t0",
    ...) and ``side`` (the live objects it names: actor handles, constants, communicators).
    """

    def __init__(self, ir, side, origin: str = "<unknown>"):
        self.ir = ir
        self.side = side
        self.origin = origin          # the user's file, named in generated modules

    @property
    def actor_ids(self) -> tuple[str, ...]:
        """The DAG's actors as the IR names them ("a0", "a1", ...), in order."""
        return tuple(a.id for a in self.ir.actors)

    def as_text(self) -> str:
        """The IR, one op a line (``t3 = a1.fwd(t2, #0, k=$1)``)."""
        return str(self.ir)

    def lower(self, placement: Placement | None = None, **options) -> "Lowered":
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

    def __init__(self, traced: Traced, ir, modules: dict, placement: Placement, options: dict,
                 timings: dict):
        self.traced = traced
        self.ir = ir
        self.modules = modules
        self.placement = placement
        self.options = options
        self.timings = timings

    @property
    def schedule(self):
        """The :class:`dagc.Schedule`: what each process does at each step."""
        return self.ir.schedule

    def sources(self) -> dict:
        """The generated modules' text, by actor id (and "driver")."""
        return {a: m.source for a, m in self.modules.items()}

    def source(self, actor) -> str:
        """The generated module of ``actor`` (an ActorHandle or its schedule name)."""
        from dagc.runtime.driver.compiled import resolve_actor
        return self.modules[resolve_actor(self.ir, self.traced.side.handles, actor)].source

    def as_text(self) -> str:
        """The schedule: the Step x Actor table, with its calls and channels."""
        return str(self.ir.schedule)

    def visualize(self, format: str = "ascii"):
        """The dataflow graph: "ascii" (always), "dot", "svg" or "png" (need Graphviz)."""
        from dagc.inspect.graph import render
        return render(self.ir.schedule, format)

    def dump(self, directory) -> None:
        """Write the generated modules, schedule.{txt,json,csv} and graph.dot."""
        from dagc.inspect.artifacts import write_artifacts
        write_artifacts(directory, self.ir.schedule, self.sources(), None)

    def load(self):
        """Start the loops: returns a running :class:`dagc.CompiledDag`.

        Asks each actor where it runs (one call each). If that differs from the placement
        this was lowered with - always so for a Lowered made without one, which also lacks
        where the methods are defined - it lowers again with the real placement first (this
        object stays as it is); then it opens the channels and starts the loops.
        """
        _require_ray()
        t0 = time.perf_counter()
        probes, placement = probe(self.traced, self.options["start_timeout"])
        lowered = self if _same(placement, self.placement, self.traced.actor_ids) \
            else _lower(self.traced, placement, self.options)
        return lowered._start(probes, t0)

    def _start(self, probes: dict, t_start: float, cls=None):
        """Load onto actors whose probe results are ``probes`` (this Lowered's placement).
        ``cls``: the CompiledDag class to make (dagc.ray_graph's subclass, under the patch)."""
        if cls is None:
            from dagc.runtime.driver.compiled import CompiledDag as cls
        timings = dict(self.timings)
        t0 = time.perf_counter()
        cg = cls(self.ir, self.traced.side, self.modules, self.options, probes,
                 timings=timings, driver_node=self.placement.driver_node,
                 profile_sources=self._profile_sources)
        timings["start"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        if self.options["output_dir"]:
            cg.dump(self.options["output_dir"])
        return cg

    def _profile_sources(self) -> list:
        """The profiling variant of every actor's module (timing calls compiled in)."""
        from dagc.codegen import render_actor
        return [render_actor(self.ir, self.ir.schedule, a.id, self.traced.origin,
                             profile=True).source for a in self.ir.actors]

    def _repr_html_(self) -> str:
        from dagc.inspect.html import compiled_html
        return compiled_html(self.ir.schedule, self.sources())

    def __repr__(self) -> str:
        return (f"<dagc.Lowered {len(self.ir.actors)} actors, {len(self.ir.channels)} "
                f"channels, {self.ir.schedule.num_steps} steps>")


def compile(dag, **options):
    """Compile a Ray DAG into generated actor loops and start them: :func:`trace`, then
    :func:`probe` the actors, then lower once with their placement, then load. Returns a
    running CompiledDag."""
    return compile_as(None, dag, options)


def compile_as(cls, dag, options: dict, check=None):
    """:func:`compile`, making a ``cls`` (a CompiledDag subclass; None: CompiledDag).
    ``check(traced)`` may refuse the traced DAG before any actor is asked anything."""
    t_start = time.perf_counter()
    opts = check_options(options)
    _require_ray()
    traced = trace(dag)
    if check is not None:
        check(traced)
    probes, placement = probe(traced, opts["start_timeout"])
    return _lower(traced, placement, opts)._start(probes, t_start, cls)


def probe(traced: Traced, timeout: float = 120.0) -> tuple[dict, Placement]:
    """Ask each actor of ``traced`` where it runs (one read-only call each; no loop
    started, no channel made). Returns ({actor id: runtime probe}, Placement). An actor
    already running another compiled DAG is a CompileError."""
    import ray

    from dagc.ir import CALL
    from dagc.runtime.driver.calls import probe_actors
    methods: dict = {}
    for op in traced.ir.ops():
        if op.kind == CALL:
            methods.setdefault(op.actor, set()).add(op.method)
    probes = probe_actors(traced.side.handles, {a: sorted(m) for a, m in methods.items()},
                          timeout)
    driver_node = ray.get_runtime_context().get_node_id()
    return probes, Placement(driver_node=driver_node,
                             actors={a: p.place for a, p in probes.items()})


def _lower(traced: Traced, placement: Placement, opts: dict) -> Lowered:
    from dagc.codegen import render_all
    from dagc.passes import PassContext, default_pipeline, run_pipeline
    keep = {k: v for k, v in opts.items() if k in ("buffer_size", "max_inflight", "communicator")}
    ir = traced.ir.replace(options=tuple(sorted((k, v) for k, v in keep.items()
                                                if isinstance(v, (int, str)))))
    ctx = PassContext(placement=placement, options=opts)
    t0 = time.perf_counter()
    ir = run_pipeline(ir, default_pipeline(opts["overlap_communication"], opts["reorder"]), ctx)
    ctx.timings["passes"] = time.perf_counter() - t0
    _check_devices(ir)
    t0 = time.perf_counter()
    modules = render_all(ir, traced.origin)
    ctx.timings["codegen"] = time.perf_counter() - t0
    return Lowered(traced, ir, modules, placement, opts, ctx.timings)


def _check_devices(ir) -> None:
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
                    f"transport's device) or device='cpu'.")


def _same(a: Placement, b: Placement, actor_ids) -> bool:
    """Whether lowering would see the same facts in ``a`` and ``b``."""
    return a.driver_node == b.driver_node and all(a.of(x) == b.of(x) for x in actor_ids)


def _require_ray() -> None:
    import ray
    if not ray.is_initialized():
        raise CompileError("Ray is not initialised; call ray.init() (or create the actors) "
                           "before dagc.compile().")


def _origin() -> str:
    """The user's file that called into dagc, relative to the working directory."""
    frame = sys._getframe(1)
    while frame is not None:
        fn = frame.f_code.co_filename
        if "dagc" + os.sep not in fn or os.sep + "examples" + os.sep in fn:
            try:
                return os.path.relpath(fn)
            except ValueError:
                return fn
        frame = frame.f_back
    return "<unknown>"

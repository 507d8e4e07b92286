"""``dagc.compile``: trace -> passes -> codegen -> load onto the actors."""
from __future__ import annotations

import os
import sys
import time

from dagc.errors import CompileError

WAIT_MODES = ("spin", "block", "adaptive")
DEFAULTS = {
    "max_inflight": 8,
    "buffer_size": 1 << 20,
    "get_timeout": None,
    "wait": "adaptive",
    "communicator": "auto",
    "overlap_communication": False,
    "output_dir": None,
    "profile": False,
    "start_timeout": 120.0,
    "teardown_timeout": 5.0,
}


def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"compile() got unknown option(s) {', '.join(unknown)}; "
                        f"options are: {', '.join(k for k in DEFAULTS if k[0] != '_')}")
    o = {**DEFAULTS, **options}
    if not isinstance(o["max_inflight"], int) or isinstance(o["max_inflight"], bool) \
            or o["max_inflight"] < 1:
        raise ValueError(f"max_inflight must be an int >= 1, got {o['max_inflight']!r}")
    if not isinstance(o["buffer_size"], int) or o["buffer_size"] < 64:
        raise ValueError(f"buffer_size must be an int >= 64 bytes, got {o['buffer_size']!r}")
    if o["get_timeout"] is not None and not (o["get_timeout"] > 0):
        raise ValueError(f"get_timeout must be None or > 0, got {o['get_timeout']!r}")
    if o["wait"] not in WAIT_MODES:
        raise ValueError(f"wait must be one of {', '.join(WAIT_MODES)}, got {o['wait']!r}")
    comm = o["communicator"]
    if isinstance(comm, str):
        if comm not in ("auto", "nccl", "gloo"):
            raise ValueError(f"communicator must be 'auto', 'nccl', 'gloo' or a "
                             f"dagc.Communicator instance, got {comm!r}")
    else:
        from dagc.runtime.comm.base import Communicator
        if not isinstance(comm, Communicator):
            raise ValueError(f"communicator must be 'auto', 'nccl', 'gloo' or a "
                             f"dagc.Communicator instance, got {type(comm).__name__}")
    return o


def _origin() -> str:
    """The user's file that called compile(), relative to the working directory."""
    frame = sys._getframe(2)
    while frame is not None:
        fn = frame.f_code.co_filename
        if "dagc" + os.sep not in fn or os.sep + "examples" + os.sep in fn:
            try:
                return os.path.relpath(fn)
            except ValueError:
                return fn
        frame = frame.f_back
    return "<unknown>"


def lower(dag, options: dict, placement: dict | None = None, driver_node: str = "",
          traced=None):
    """Trace (unless ``traced`` is trace(dag)'s result) and run the pass pipeline.

    No actors are touched. Returns (ir, side, ctx).
    """
    from dagc.frontend import trace
    from dagc.passes import PassContext, default_pipeline, run_pipeline
    ir, side = traced if traced is not None else trace(dag)
    opts = {k: v for k, v in options.items()
            if k in ("buffer_size", "max_inflight", "communicator")}
    ir = ir.replace(options=tuple(sorted((k, v) for k, v in opts.items()
                                         if isinstance(v, (int, str)))))
    ctx = PassContext(placement=placement or {}, driver_node=driver_node, options=options)
    t0 = time.perf_counter()
    ir = run_pipeline(ir, default_pipeline(options.get("overlap_communication", False)), ctx)
    ctx.timings["passes"] = time.perf_counter() - t0
    return ir, side, ctx


def compile(dag, **options):
    """Compile a Ray DAG into generated actor loops and start them. Returns a CompiledDag."""
    import ray

    from dagc.codegen import render_all
    from dagc.frontend import trace
    from dagc.runtime.actor import loop as worker
    from dagc.runtime.driver.calls import ray_get
    from dagc.runtime.driver.compiled import CompiledDag
    t_start = time.perf_counter()
    opts = check_options(options)
    origin = _origin()
    if not ray.is_initialized():
        raise CompileError("Ray is not initialised; call ray.init() (or create the actors) "
                           "before dagc.compile().")
    traced = trace(dag)
    side0 = traced[1]
    actor_ids = list(side0.handles)
    procs = ["driver"] + actor_ids
    probes = ray_get([side0.handles[a].__ray_call__.remote(worker.probe, "")
                       for a in actor_ids], opts["start_timeout"], procs,
                      what="report where they run")
    for a, p in zip(actor_ids, probes):
        if p["busy"]:
            raise CompileError(f"actor {a} already runs compiled DAG {p['busy'][0]}; tear that "
                               f"DAG down (cg.teardown()) before compiling another on it.")
    placement = {a: (p["node"], p["gpus"]) for a, p in zip(actor_ids, probes)}
    driver_node = ray.get_runtime_context().get_node_id()
    ir, side, ctx = lower(dag, opts, placement, driver_node, traced)
    t0 = time.perf_counter()
    mods = render_all(ir, origin)
    ctx.timings["codegen"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = CompiledDag(ir, side, mods, opts, probes, origin=origin, timings=ctx.timings,
                     driver_node=driver_node)
    ctx.timings["start"] = time.perf_counter() - t0
    ctx.timings["total"] = time.perf_counter() - t_start
    if opts["output_dir"]:
        cg.dump(opts["output_dir"])
    return cg


def get(refs, timeout: float | None = None) -> list:
    """Values of several DagRefs, in order; ``timeout`` bounds the whole call."""
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for r in refs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        out.append(r.get(timeout=left))
    return out

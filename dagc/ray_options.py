"""Ray's ``experimental_compile`` keywords and ``DAGContext`` settings as dagc options:
what :func:`dagc.patch_ray`'s ``experimental_compile`` compiles with
(``dagc/ray_compat.py``), and the warnings it gives once for those without effect.

This module imports nothing from Ray at import time (Ray's modules load on first use).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from types import FrameType

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"dagc.patch_ray: {message}", RuntimeWarning, stacklevel=_user_level())


def _user_level() -> int:
    """warnings.warn's stacklevel of the first caller outside dagc and contextlib."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and (
        frame.f_code.co_filename.startswith(here) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


def map_compile_options(
    *,
    _submit_timeout=None,
    _buffer_size_bytes=None,
    enable_asyncio=False,
    _max_inflight_executions=None,
    _max_buffered_results=None,
    _overlap_gpu_communication=None,
    _default_communicator="create",
    **unknown,
) -> tuple[dict, dict]:
    """Ray 2.60's ``experimental_compile`` keywords and ``DAGContext`` -> (dagc options,
    Ray-side settings). The DAGContext's defaults are Ray's ``RAY_CGRAPH_*`` environment
    variables (``ray/dag/context.py`` reads them), so they are honoured with Ray's meaning.

    ==================================  ========================================================
    Ray                                 dagc
    ==================================  ========================================================
    _buffer_size_bytes                  buffer_size (default RAY_CGRAPH_buffer_size_bytes)
    _max_inflight_executions            max_inflight (RAY_CGRAPH_max_inflight_executions)
    DAGContext.get_timeout              get_timeout (RAY_CGRAPH_get_timeout; -1: wait forever)
    DAGContext.teardown_timeout         teardown_timeout (RAY_CGRAPH_teardown_timeout)
    DAGContext.read_iteration_timeout   _read_slice: how long the driver waits on one output
                                        before looking at the others for a failure
                                        (RAY_CGRAPH_read_iteration_timeout_s)
    _overlap_gpu_communication          overlap_communication (RAY_CGRAPH_overlap_gpu_...)
    _default_communicator "create"      communicator "auto"; a dagc.Communicator passes through,
                                        a Ray one is adapted (runtime/comm/ray_adapter.py);
                                        None: tensor-transport nodes must name a communicator
    enable_asyncio                      execute_async() as Ray's (execute() stays usable)
    RAY_CGRAPH_VISUALIZE_SCHEDULE       prints the schedule (the Step x Actor table)
    (none; DAGC_MAX_QUEUED)             max_queued: executions past max_inflight wait in
                                        the driver (Ray has no such queue)
    _submit_timeout, RAY_CGRAPH_        no effect, warns once: dagc's execute() never waits
      submit_timeout                    for room; it raises RayCgraphCapacityExceeded at
                                        max_inflight, as Ray does
    _max_buffered_results, RAY_CGRAPH_  no effect, warns once: dagc buffers a result only
      max_buffered_results              while its execution is unfetched (<= max_inflight)
    RAY_CGRAPH_ENABLE_PROFILING,        no effect, warn once: dagc's profiling is
      _NVTX_PROFILING, _TORCH_PROFILING cg.profile(n) (per-op Chrome trace via cg.dump)
    RAY_CGRAPH_ENABLE_DETECT_DEADLOCK=0 no effect, warns once: dagc always proves its
                                        schedule free of deadlocks
    ==================================  ========================================================
    """
    if unknown:
        raise TypeError(
            f"experimental_compile() got unexpected keyword argument(s) "
            f"{', '.join(sorted(unknown))}"
        )
    from ray.dag import DAGContext
    from ray.dag import constants as rc
    from ray.dag import context as rctx

    ctx = DAGContext.get_current()
    opts: dict = {}
    size = int(_buffer_size_bytes if _buffer_size_bytes is not None else ctx.buffer_size_bytes)
    opts["buffer_size"] = max(64, size)
    inflight = (
        _max_inflight_executions
        if _max_inflight_executions is not None
        else ctx.max_inflight_executions
    )
    opts["max_inflight"] = int(inflight)
    gt = ctx.get_timeout
    opts["get_timeout"] = None if gt is None or gt < 0 else max(float(gt), 1e-3)
    if ctx.teardown_timeout is not None and ctx.teardown_timeout > 0:
        opts["teardown_timeout"] = float(ctx.teardown_timeout)
    rit = getattr(ctx, "read_iteration_timeout", None)
    if rit is not None and rit > 0:
        opts["_read_slice"] = float(rit)
    overlap = (
        _overlap_gpu_communication
        if _overlap_gpu_communication is not None
        else ctx.overlap_gpu_communication
    )
    opts["overlap_communication"] = bool(overlap)
    queued = os.environ.get("DAGC_MAX_QUEUED", "").strip()
    if queued:  # no Ray keyword maps to dagc's queue past max_inflight: its own variable
        try:
            opts["max_queued"] = int(queued)
        except ValueError:
            raise ValueError(f"DAGC_MAX_QUEUED must be an int >= 0, got {queued!r}") from None
    comm = _default_communicator
    need_named_comm = comm is None
    if comm is None or comm == "create":
        opts["communicator"] = "auto"
    elif isinstance(comm, str):
        raise ValueError(
            f"_default_communicator must be 'create', None or a Communicator, got {comm!r}"
        )
    else:
        from dagc.errors import CompileError
        from dagc.runtime.comm.ray_adapter import adapt

        try:  # a Ray Communicator (CPUCommunicator, ...) is adapted
            opts["communicator"] = adapt(comm, "_default_communicator")
        except ValueError as e:
            raise CompileError(
                f"{e}; or leave the default 'create' to let dagc set one up."
            ) from None
    if (
        _submit_timeout is not None
        or "RAY_CGRAPH_submit_timeout" in os.environ
        or ctx.submit_timeout != rctx.DEFAULT_SUBMIT_TIMEOUT_S
    ):
        warn_once(
            "submit_timeout",
            "_submit_timeout / RAY_CGRAPH_submit_timeout has no "
            "effect: dagc's execute() never waits for room in a channel; at "
            "max_inflight (_max_inflight_executions) unfetched executions it raises "
            "RayCgraphCapacityExceeded at once, as Ray does.",
        )
    if (
        _max_buffered_results is not None
        or "RAY_CGRAPH_max_buffered_results" in os.environ
        or ctx.max_buffered_results != rctx.DEFAULT_MAX_BUFFERED_RESULTS
    ):
        warn_once(
            "max_buffered_results",
            "_max_buffered_results / "
            "RAY_CGRAPH_max_buffered_results has no effect: dagc buffers a result "
            "only while its execution is unfetched, so at most max_inflight "
            "(_max_inflight_executions) results are ever buffered.",
        )
    if getattr(rc, "RAY_CGRAPH_ENABLE_PROFILING", False):
        warn_once(
            "profiling",
            "RAY_CGRAPH_ENABLE_PROFILING has no effect: dagc records "
            "per-op timings with cg.profile(n) (a Chrome trace with cg.dump()).",
        )
    if getattr(rc, "RAY_CGRAPH_ENABLE_NVTX_PROFILING", False) or getattr(
        rc, "RAY_CGRAPH_ENABLE_TORCH_PROFILING", False
    ):
        warn_once(
            "nvtx",
            "RAY_CGRAPH_ENABLE_NVTX_PROFILING / _TORCH_PROFILING have no "
            "effect: dagc's profiling is cg.profile(n).",
        )
    if not getattr(rc, "RAY_CGRAPH_ENABLE_DETECT_DEADLOCK", True):
        warn_once(
            "deadlock",
            "RAY_CGRAPH_ENABLE_DETECT_DEADLOCK=0 has no effect: dagc "
            "always proves its schedule free of deadlocks before starting it.",
        )
    ray_side = {
        "enable_asyncio": bool(enable_asyncio),
        "get_timeout": gt,
        "need_named_communicator": need_named_comm,
        "visualize_schedule": bool(getattr(rc, "RAY_CGRAPH_VISUALIZE_SCHEDULE", False)),
    }
    return opts, ray_side


def check_named_communicators(traced) -> None:
    """``_default_communicator=None`` (Ray): every tensor-transport node and collective
    must name its communicator."""
    from dagc.errors import CompileError

    bare = [
        f"{op.actor}.{op.method}"
        for op in traced.ir.ops()
        if op.transport in ("nccl", "auto", "gloo")
    ]
    if bare:
        raise CompileError(
            f"_default_communicator=None requires a communicator on every tensor-transport "
            f"node and collective, but {', '.join(bare)} name none: pass "
            f"with_tensor_transport(transport=<a dagc.Communicator>) (or the collective's "
            f"transport=), or compile with the default _default_communicator='create'."
        )

"""dagc: an ahead-of-time compiler for Ray actor DAGs.

    import dagc
    from dagc import InputNode, MultiOutputNode
    with InputNode() as inp:
        dag = b.fwd.bind(a.fwd.bind(inp))
    with dagc.compile(dag) as cg:
        print(cg.execute(1).get())

``dagc.compile`` is three stages in a row, each of which can be stopped at:
``dagc.trace(dag)`` -> ``Traced`` (the IR), ``.lower(**options)`` -> ``Lowered`` (schedule
and generated modules, no actor touched), ``.load()`` -> ``CompiledDag`` (see dagc.stages).
"""
from dagc.version import __version__  # noqa: F401

from ray.dag import InputNode, MultiOutputNode  # noqa: E402  (the same classes as Ray's)

from dagc.api import compile, get  # noqa: E402
from dagc.errors import (ActorDiedError, CapacityError, CompileError, DagClosedError,  # noqa: E402
                         DagcError, DagTimeoutError, DeadlockError, ExecuteArgumentError,
                         TaskError)
from dagc.pipelining import pipeline  # noqa: E402
from dagc.placement import Placement, reorderable  # noqa: E402
from dagc.ray_compat import patch_ray, unpatch_ray  # noqa: E402
from dagc.ray_compat import patched as patched_ray  # noqa: E402
from dagc.stages import Lowered, Traced, trace  # noqa: E402


def __getattr__(name):
    # heavy or optional pieces load on first use
    if name in ("Schedule", "Action"):
        from dagc import schedule
        return getattr(schedule, name)
    if name == "Costs":
        from dagc.schedule.costs import Costs
        return Costs
    if name in ("CompiledDag", "DagRef", "Profile"):
        from dagc.runtime.driver import compiled
        return getattr(compiled, name)
    if name == "Communicator":
        from dagc.runtime.comm.base import Communicator
        return Communicator
    if name == "GlooCommunicator":
        from dagc.runtime.comm.gloo import GlooCommunicator
        return GlooCommunicator
    if name == "NcclCommunicator":
        from dagc.runtime.comm.nccl import NcclCommunicator
        return NcclCommunicator
    raise AttributeError(f"module 'dagc' has no attribute {name!r}")


__all__ = ["compile", "get", "trace", "Traced", "Lowered", "Placement", "InputNode",
           "MultiOutputNode", "CompiledDag", "DagRef", "Profile", "Schedule", "Action",
           "Communicator", "GlooCommunicator", "NcclCommunicator", "DagcError", "CompileError",
           "DeadlockError", "TaskError", "DagTimeoutError", "CapacityError", "ActorDiedError",
           "DagClosedError", "ExecuteArgumentError", "pipeline", "reorderable", "Costs", "patch_ray", "unpatch_ray", "patched_ray"]

from dagc import ray_compat as _ray_compat  # noqa: E402

_ray_compat.autopatch_from_env()      # DAGC_PATCH_RAY=1: experimental_compile is dagc's

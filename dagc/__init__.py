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

from typing import TYPE_CHECKING, Any

from ray.dag import InputNode, MultiOutputNode  # the same classes as Ray's

from dagc import ray_compat as _ray_compat
from dagc.api import compile, get
from dagc.errors import (
    ActorDiedError,
    CapacityError,
    CompileError,
    DagcError,
    DagClosedError,
    DagTimeoutError,
    DeadlockError,
    ExecuteArgumentError,
    TaskError,
)
from dagc.pipelining import pipeline
from dagc.placement import Placement, reorderable
from dagc.ray_compat import patch_ray, unpatch_ray
from dagc.ray_compat import patched as patched_ray
from dagc.stages import Lowered, Traced, trace
from dagc.version import __version__ as __version__

if TYPE_CHECKING:  # what __getattr__ loads on first use, named for type checkers
    from dagc.runtime.comm.base import Communicator
    from dagc.runtime.comm.gloo import GlooCommunicator
    from dagc.runtime.comm.nccl import NcclCommunicator
    from dagc.runtime.driver.compiled import CompiledDag, DagRef, Profile, RestartEvent
    from dagc.schedule import Action, Schedule
    from dagc.schedule.costs import Costs


def __getattr__(name: str) -> Any:
    # heavy or optional pieces load on first use
    if name in ("Schedule", "Action"):
        from dagc import schedule

        return getattr(schedule, name)
    if name == "Costs":
        from dagc.schedule.costs import Costs

        return Costs
    if name in ("CompiledDag", "DagRef", "Profile", "RestartEvent"):
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


__all__ = [
    "compile",
    "get",
    "trace",
    "Traced",
    "Lowered",
    "Placement",
    "InputNode",
    "MultiOutputNode",
    "CompiledDag",
    "DagRef",
    "Profile",
    "RestartEvent",
    "Schedule",
    "Action",
    "Communicator",
    "GlooCommunicator",
    "NcclCommunicator",
    "DagcError",
    "CompileError",
    "DeadlockError",
    "TaskError",
    "DagTimeoutError",
    "CapacityError",
    "ActorDiedError",
    "DagClosedError",
    "ExecuteArgumentError",
    "pipeline",
    "reorderable",
    "Costs",
    "patch_ray",
    "unpatch_ray",
    "patched_ray",
]

# last, once every public name is bound:
_ray_compat.autopatch_from_env()  # DAGC_PATCH_RAY=1: experimental_compile is dagc's

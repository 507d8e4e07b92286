"""What the driver calls inside an actor, through ``actor.__ray_call__.remote(fn, ...)``.

Ray calls ``fn(instance, ...)`` in the actor's process, so the user's class needs nothing
from dagc. In the order a compiled DAG meets them: :func:`probe` (where it runs, whether it
is free), ``prepared.prepare`` (only across nodes or over TCP), :func:`comm_prepare`
(rank 0 of a communicator group), :func:`start`; then :func:`swap` / :func:`resume` /
:func:`fetch_profile` while profiling, :func:`status` when the driver wants to know why a
loop stopped, and :func:`stop`.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass

from dagc.placement import ActorPlace
from dagc.runtime.actor import prepared
from dagc.runtime.actor.loop import LOCK, LOOPS, ActorLoop, max_concurrency
from dagc.runtime.actor.plan import ActorPlan
from dagc.runtime.channels import shm, sweep
from dagc.runtime.channels.control import C_STATE, RUNNING, SWAP

# how long a crashed loop of a DAG whose driver never called stop() stays listed
_CRASH_KEPT = 600.0


@dataclass(frozen=True)
class Probe:
    """What the probe round learns about one actor."""

    place: ActorPlace  # node, GPU ids, where its bound methods are defined
    pid: int
    ip: str  # its node's address, for TCP channels
    busy: tuple = ()  # tokens of the compiled DAGs this actor runs already
    # (information: a new one runs beside them)
    max_concurrency: int = 1  # Ray's: above 1, its DAGs' method calls may overlap


def probe(instance, token: str, methods: tuple = (), cwd: str = "") -> Probe:
    """Where this actor lives, where ``methods`` of its class are defined, and which other
    compiled DAGs it runs already."""
    import ray

    prepared.expire()
    busy = tuple(t for t, lp in LOOPS.items() if lp.running() and t != token)
    ctx = ray.get_runtime_context()
    try:
        gpus = tuple(ray.get_gpu_ids())
    except Exception:
        gpus = ()
    where = {}
    for name in methods:
        at = _defined_at(type(instance), name, cwd)
        if at:
            where[name] = at
    free = tuple(sorted(n for n in methods if _reorderable(type(instance), n)))
    return Probe(
        place=ActorPlace(node=ctx.get_node_id(), gpus=gpus, methods=where, reorderable=free),
        pid=os.getpid(),
        ip=ray.util.get_node_ip_address(),
        busy=busy,
        max_concurrency=max_concurrency(),
    )


def _reorderable(cls, name: str) -> bool:
    """Whether method ``name`` of ``cls`` is marked ``@dagc.reorderable``."""
    from dagc.placement import REORDERABLE

    try:
        fn = getattr(cls, name)
    except AttributeError:
        return False
    return any(
        getattr(f, REORDERABLE, False) is True
        for f in (fn, getattr(fn, "__func__", None), getattr(fn, "__wrapped__", None))
    )


def _defined_at(cls, name: str, cwd: str) -> str | None:
    """Where method ``name`` of ``cls`` is written, as "pipeline.py:23 Embedder.embed" (the
    file relative to ``cwd`` when it lies below it); None when that cannot be told."""
    try:
        fn = inspect.unwrap(getattr(cls, name))
        fn = getattr(fn, "__func__", fn)
        code = fn.__code__
        path = code.co_filename
        if cwd:
            rel = os.path.relpath(path, cwd)
            if not rel.startswith(os.pardir + os.sep):
                path = rel
        return f"{path}:{code.co_firstlineno} {getattr(fn, '__qualname__', name)}"
    except Exception:
        return None


def comm_prepare(instance, communicator) -> dict:
    """Rank 0 of a communicator group: make the rendezvous info the others need."""
    return communicator.prepare()


def start(instance, plan: ActorPlan) -> dict:
    """Open this actor's ends, form its communicators, bind its module, start its loop,
    beside the loops of any other compiled DAGs this actor runs (each its own thread)."""
    prepared.expire()
    if plan.node_cleanup:  # segments of DAGs whose processes all died together (a live
        try:  # DAG's segments list live pids: the sweep never takes them)
            sweep.sweep_stale()
        except OSError:
            pass
    with LOCK:
        now = time.monotonic()
        for t, lp in list(LOOPS.items()):
            # a loop that ended without crashing has removed itself; a crashed one stays
            # for its DAG's status() and stop(), unless that DAG is long gone
            if not lp.running() and (lp.crash is None or now - lp.ended > _CRASH_KEPT):
                LOOPS.pop(t, None)
        if plan.token in LOOPS:
            _abort(plan)
            raise RuntimeError(f"dagc: {plan.label} already runs a loop of compile {plan.token}")
        try:
            loop = ActorLoop(instance, plan)
        except BaseException as e:
            _abort(plan)  # the ends it opened are closed already
            prepared.drop_frames(e)
            raise
        LOOPS[plan.token] = loop
    try:
        loop.start()
    except BaseException as e:
        LOOPS.pop(plan.token, None)
        loop.close()
        _abort(plan)
        prepared.drop_frames(e)
        raise
    return {"pid": os.getpid()}


def _abort(plan: ActorPlan) -> None:
    """This actor's start failed, so the compile does: leave nothing of it here."""
    prepared.discard(plan.token)
    if plan.node_cleanup:  # the node's leader: the node's segments too
        shm.unlink_prefix(plan.prefix)


def stop(instance, token: str, timeout: float = 2.0) -> dict:
    prepared.discard(token)  # a compile that failed before this loop started
    loop = LOOPS.pop(token, None)
    if loop is None:
        return {"stopped": False}
    return loop.stop(timeout)


def swap(instance, token: str, source: str | None, timeout: float = 5.0) -> bool:
    """Park the loop and rebind it to ``source`` (a profiling variant), or back (None)."""
    loop = LOOPS.get(token)
    return loop.swap(source, timeout) if loop else False


def resume(instance, token: str) -> None:
    """After every loop of the DAG parked for a swap: let this node's loops run again."""
    loop = LOOPS.get(token)
    if loop is not None and loop.control.state == SWAP:
        loop.control.words[C_STATE] = RUNNING


def fetch_profile(instance, token: str) -> list:
    loop = LOOPS.get(token)
    return list(loop.records) if loop else []


def memory(instance, token: str) -> list:
    """What this actor's shared-memory channel ends of one DAG hold (``cg.memory()``)."""
    loop = LOOPS.get(token)
    if loop is None:
        return []
    ends = list(loop._writers.values()) + list(loop._readers.values())
    return [dict(e.stats(), pid=os.getpid()) for e in ends if hasattr(e, "stats")]


def status(instance, token: str) -> dict:
    loop = LOOPS.get(token)
    return {"running": bool(loop and loop.running()), "crash": loop.crash if loop else None}

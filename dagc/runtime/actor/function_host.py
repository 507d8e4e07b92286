"""The actors dagc creates for a DAG's function nodes (``f.bind(...)``), and their end.

A :class:`FunctionHost` holds one user function as an attribute named as the generated loop
calls it, so the loop calls the function as it calls any actor method: the rest of dagc
(probe, schedule, generated module, channels, failures) sees an actor like any other.

:func:`create` makes one host per function actor of a traced DAG (``dagc/frontend/
functions.py``: what to create, with which Ray options) when the DAG is loaded, and waits
until each is placed. The DAG owns them: its side table is an :class:`OwnedSide`, and
:func:`release`, which the DAG's one release routine calls (``Session.release``: teardown,
garbage collection, a process's death, a failed start), kills them. A compile that fails
before there is a DAG kills them itself (``dagc/stages.py``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from dagc.errors import CompileError
from dagc.ir import SideTable

_HOST = None  # ray.remote(FunctionHost), made once


class FunctionHost:
    """A Ray actor that runs one function node of a compiled DAG. ``fn`` arrives pickled by
    value (cloudpickle, through Ray), as a Ray task's function does."""

    def __init__(self, method: str, fn):
        setattr(self, method, fn)

    def __repr__(self) -> str:  # what Ray's logs and errors show for this actor
        return f"dagc FunctionHost({', '.join(k for k in vars(self))})"


@dataclass
class OwnedSide(SideTable):
    """A loaded DAG's side table: ``owned`` lists the actor handles the DAG created and
    must kill when it is released."""

    owned: list = field(default_factory=list)


def _host():
    global _HOST
    if _HOST is None:
        import ray

        _HOST = ray.remote(FunctionHost)
    return _HOST


def create(specs: dict, timeout: float) -> dict:
    """One FunctionHost per entry of ``specs`` (actor id -> the frontend's FunctionActor),
    created with the entry's actor options; returns {actor id: ActorHandle} once every host
    is placed and constructed. Any failure kills what was created and raises a
    CompileError naming the function."""
    import ray
    from ray.exceptions import RayActorError

    made: dict = {}
    try:
        for aid, spec in specs.items():
            try:
                cls = _host().options(**spec.options)
            except (TypeError, ValueError) as e:
                raise CompileError(
                    f"function node {aid}:{spec.method}: its Ray options "
                    f"{_shown(spec.task_options)} cannot run it on an actor: "
                    f"{e}"
                ) from None
            made[aid] = cls.remote(spec.method, spec.fn)
        ready = {h.__ray_ready__.remote(): aid for aid, h in made.items()}
        done, pending = ray.wait(list(ready), num_returns=len(ready), timeout=timeout)
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError as e:
                spec = specs[ready[ref]]
                raise CompileError(
                    f"function node {ready[ref]}:{spec.method}: the actor dagc created to run "
                    f"it failed to start (is the function's module importable on the "
                    f"workers?): {e}"
                ) from None
        if pending:
            aid = ready[pending[0]]
            spec = specs[aid]
            raise CompileError(
                f"function node {aid}:{spec.method}: the actor dagc creates to run it was not "
                f"placed within {timeout} s (start_timeout). It asks for "
                f"{_shown(spec.options) or 'Ray actor defaults'}; see `ray status` for what "
                f"the cluster has free."
            )
        return made
    except BaseException:
        kill(made.values())
        raise


def owning(side: SideTable, created: dict) -> OwnedSide:
    """``side`` with the created hosts in place of their FunctionActors, owning them."""
    return OwnedSide(
        handles={**side.handles, **created},
        constants=side.constants,
        communicators=side.communicators,
        owned=list(created.values()),
    )


def release(side) -> None:
    """Kill the actors ``side`` owns (none unless it is an OwnedSide), once."""
    owned = getattr(side, "owned", None)
    if owned:
        handles, owned[:] = list(owned), []
        kill(handles)


def kill(handles) -> None:
    """``ray.kill`` each handle, never restarting it. Only while Ray is connected: a Ray
    call after ``ray.shutdown()`` would start a new Ray (the actors ended with the old).

    Garbage collection may release a DAG on a thread Ray started (a callback of its own),
    where a Ray call could wait on that very thread: from such a thread (one Python did not
    start) the kills run on a short-lived thread of their own."""
    import ray

    if not ray.is_initialized():
        return
    handles = list(handles)
    if isinstance(threading.current_thread(), threading._DummyThread):
        threading.Thread(target=_kill, args=(handles,), daemon=True).start()
    else:
        _kill(handles)


def _kill(handles) -> None:
    import ray

    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # already dead, or a handle of an earlier Ray session
            pass


def _shown(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))

"""``CompiledDag``: a compiled DAG whose actor loops are running, composed of parts that own
their state.

    Session      (session.py)     the token, control segment, channel ends, actor handles;
                                  starting and stopping the loops
    Executions   (executions.py)  submit / fetch counters, the result buffer, the locks,
                                  closed or dead; teardown
    Profiler     (profiling.py)   profiled runs and the last Profile
    Restarts     (restart.py)     running again after Ray restarts an actor of the DAG
    (watcher.py)                  one thread per process: deaths while the DAG is idle

Inspection (``schedule``, ``source``, ``visualize``, ``dump``) reads plain data: the lowered
IR and the generated modules.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from dagc.ir import DRIVER, IR
from dagc.runtime.driver import watcher
from dagc.runtime.driver.dagref import DagRef
from dagc.runtime.driver.executions import executions_for
from dagc.runtime.driver.profiling import Profile, Profiler
from dagc.runtime.driver.restart import RestartEvent, Restarts
from dagc.runtime.driver.session import Session

CREATED_PREFIXES: list[str] = []  # every segment prefix this process made (leak checks)

__all__ = ["CompiledDag", "DagRef", "Profile", "RestartEvent", "CREATED_PREFIXES", "resolve_actor"]


class CompiledDag:
    """A compiled DAG whose actor loops are running. See docs/contract.md for the contract.

    Made by ``dagc.compile(dag)`` or ``Lowered.load()``: ``ir`` is the lowered IR, ``side``
    its live objects (actor handles, constants, communicators), ``modules`` the generated
    modules by actor id (and "driver"), ``probes`` what the probe round learnt of each
    actor, ``profile_sources`` a callable giving each actor's profiling variant.
    """

    def __init__(
        self,
        ir: IR,
        side: Any,
        modules: dict[str, Any],
        options: dict[str, Any],
        probes: dict[str, Any],
        *,
        timings: dict[str, float] | None = None,
        driver_node: str = "",
        profile_sources: Callable[[], Any] | None = None,
    ) -> None:
        self._ir = ir
        self._side = side
        self._modules = modules
        self.schedule = ir.schedule
        self.timings = timings if timings is not None else {}
        session = Session(ir, side, modules, options, probes, driver_node)
        CREATED_PREFIXES.append(session.prefix)
        submit, collect = session.start()
        runs = self._runs = executions_for(session, submit, collect, options, ir.output.multi)
        # execute() is the Executions' own bound method: a call costs what it always did
        # (a subclass that defines its own execute - dagc.ray_compat's - keeps it)
        if type(self).execute is CompiledDag.execute:
            self.execute = runs.execute  # type: ignore[method-assign]
        self._profiler = Profiler(session, runs, ir, profile_sources)
        # Ray restarts an actor (max_restarts): the DAG runs again on a new session. The
        # hook holds the profiler weakly: no cycle through the Executions
        self._restarts = Restarts(_follow(weakref.ref(self._profiler)), weakref.ref(self))
        runs._restart = self._restarts.on_stop  # type: ignore[assignment]
        watcher.watch(runs)  # a death while idle takes the same path

    @property
    def _session(self) -> Session:
        """The session the DAG runs on now (a new one after each restart)."""
        return self._runs._session

    # -- execute / teardown ----------------------------------------------------------------------
    def execute(self, *args: Any, **kwargs: Any) -> DagRef:  # replaced per instance in __init__
        """Submit one execution; returns its DagRef at once (``get()`` waits for the value)."""
        return self._runs.execute(*args, **kwargs)

    async def execute_async(self, *args: Any, **kwargs: Any) -> Any:
        """Submit one execution; the awaitable yields its value (a list for MultiOutputNode)."""
        await self._restarted()
        return await self.execute(*args, **kwargs).get_async()

    async def _restarted(self) -> None:
        """While the DAG re-prepares after a restart (execute() would block for it), wait
        off the event loop; returns at once otherwise."""
        if self._restarts.busy:
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, self._restarts.wait)

    def teardown(self) -> None:
        """Stop every loop and release every segment. Idempotent; bounded in time."""
        self._runs.teardown()
        watcher.poke()  # the watcher ends with the last live DAG

    @property
    def closed(self) -> bool:
        """Whether teardown() ran."""
        return self._runs.closed

    # -- actor restarts --------------------------------------------------------------------------
    @property
    def restarts(self) -> int:
        """How many times the DAG re-prepared an actor Ray restarted (docs/faults.md)."""
        return self._restarts.count

    def on_restart(self, fn: Callable[[RestartEvent], object]) -> Callable[[RestartEvent], object]:
        """Call ``fn(event)`` each time the DAG has re-prepared actors Ray restarted and
        accepts executions again. ``event`` is a ``RestartEvent`` (``restart.py``): count,
        actors, reason, lost, seconds. Runs on a dagc thread, so keep it short. Returns
        ``fn`` (usable as a decorator)."""
        self._restarts.callbacks.append(fn)
        return fn

    def __enter__(self) -> CompiledDag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- profiling -------------------------------------------------------------------------------
    def profile(self, n: int, *args: Any, **kwargs: Any) -> Profile:
        """Run ``n`` executions of ``execute(*args, **kwargs)`` with per-op timing.

        The loops switch to their profiling variant (timing calls compiled in) for these
        executions and back afterwards, so an unprofiled DAG pays nothing. Afterwards
        ``schedule`` shows the measured timing beside the predicted one; the Profile's
        ``costs()`` (or the Profile) can be given to ``dagc.compile(dag, costs=...)``.
        """
        prof = self._profiler.run(n, args, kwargs)
        self.schedule = self._profiler.schedule
        return prof

    # -- inspection ------------------------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        """Shared memory (/dev/shm) this DAG's channels hold now: ``shm_bytes`` in all,
        ``big_bytes`` of it in big-value segments (values bigger than ``buffer_size``;
        they go again after a burst), and per channel its writer's and readers' figures."""
        return self._session.memory()

    def sources(self) -> dict[str, str]:
        """The generated modules' text, by actor id (and "driver")."""
        return {a: m.source for a, m in self._modules.items()}

    def source(self, actor: Any) -> str:
        """The generated loop module of ``actor`` (an ActorHandle or its schedule name)."""
        return self._modules[resolve_actor(self._ir, self._side.handles, actor)].source

    def visualize(self, format: str = "ascii") -> str | bytes:
        """The dataflow graph: "ascii" (always), "dot", "svg" or "png" (need Graphviz)."""
        from dagc.inspect.graph import render

        return render(self.schedule, format)

    def dump(self, directory: str | os.PathLike[str]) -> None:
        """Write the generated modules, schedule.{txt,json,csv}, graph.dot (+ trace.json)."""
        from dagc.inspect.artifacts import write_artifacts

        last = self._profiler.last
        write_artifacts(
            directory, self.schedule, self.sources(), last.trace() if last is not None else None
        )

    def _repr_html_(self) -> str:
        from dagc.inspect.html import compiled_html

        return compiled_html(self.schedule, self.sources())

    def __repr__(self) -> str:
        return (
            f"<dagc.CompiledDag {len(self._ir.actors)} actors, "
            f"{len(self._ir.channels)} channels, {self._runs.state()}>"
        )


def _follow(profiler_ref):
    """What a restart tells the rest of the DAG of its new session: the leak checks its
    segment prefix, the profiler where to switch loops."""

    def on_session(session) -> None:
        CREATED_PREFIXES.append(session.prefix)
        prof = profiler_ref()
        if prof is not None:
            prof._session = session

    return on_session


def resolve_actor(ir, handles: dict, actor) -> str:
    """The actor id of ``actor``: an ActorHandle of the DAG, or a name as the schedule prints
    it ("a1", "a1:Stage", the Ray actor's name, or "driver")."""
    if isinstance(actor, str):
        for a in ir.actors:
            if actor in (a.id, a.label, a.name):
                return a.id
        if actor == DRIVER:
            return DRIVER
        raise KeyError(
            f"no actor {actor!r} in this DAG; actors: " + ", ".join(a.label for a in ir.actors)
        )
    for a in ir.actors:
        if handles[a.id] == actor:
            return a.id
    raise KeyError(f"{actor!r} is not an actor of this DAG")

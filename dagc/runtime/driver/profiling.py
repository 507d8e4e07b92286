"""CompiledDag's inspection methods: sources, visualize, dump, profile, HTML."""
from __future__ import annotations

import time

from dagc.ir import DRIVER
from dagc.runtime import channels as ch
from dagc.runtime.channels.control import C_STATE, SWAP
from dagc.runtime.actor import loop as worker
from dagc.runtime.driver.calls import ray_get


class Profile:
    """Per-op timings of ``n`` executions: ``str()`` is the summary, ``trace()`` Chrome JSON."""

    def __init__(self, schedule, records: dict):
        self.schedule = schedule
        self.records = records

    def summary(self) -> str:
        from dagc.inspect.trace import summary
        return summary(self.schedule, self.records)

    def to_dict(self) -> dict:
        from dagc.inspect.trace import summary_dict
        return summary_dict(self.schedule, self.records)

    def trace(self) -> dict:
        from dagc.inspect.trace import chrome_trace
        return chrome_trace(self.schedule, self.records)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.records.values())
        return f"<dagc.Profile {n} op records over {len(self.records)} processes>"


class InspectMixin:
    """CompiledDag's inspection side: it reads plain data (schedule, sources, timings)."""

    _last_profile = None
    _profiled_sources = None

    def sources(self) -> dict:
        return {a: m.source for a, m in self._modules.items()}

    def visualize(self, format: str = "ascii"):
        """The dataflow graph: "ascii" (always), "dot", "svg" or "png" (need Graphviz)."""
        from dagc.inspect.graph import render
        return render(self.schedule, format)

    def dump(self, directory) -> None:
        """Write the generated modules, schedule.{txt,json,csv}, graph.dot (+ trace.json)."""
        from dagc.inspect.artifacts import write_artifacts
        trace = self._last_profile.trace() if self._last_profile is not None else None
        write_artifacts(directory, self.schedule, self.sources(), trace)

    def _repr_html_(self) -> str:
        from dagc.inspect.html import compiled_html
        return compiled_html(self.schedule, self.sources())

    def profile(self, n: int, *args, **kwargs) -> Profile:
        """Run ``n`` executions of ``execute(*args, **kwargs)`` with per-op timing.

        The loops switch to their profiling variant (timing calls compiled in) for these
        executions and back afterwards, so an unprofiled DAG pays nothing.
        """
        from dagc.errors import DagcError
        if self._closed or self._dead:
            self._raise_closed()
        if self._submitted != self._fetched:
            raise DagcError("profile() needs every earlier execution fetched first; call "
                            "get() on the pending DagRefs.")
        sched = self.schedule
        wstep = next((a.step for a in sched.of(DRIVER) if a.kind == "send"), 0)
        rstep = max((a.step for a in sched.of(DRIVER) if a.kind == "recv"), default=0)
        self._swap(True)
        drv = []
        try:
            clock = time.monotonic_ns
            for i in range(n):
                s0 = clock()
                ref = self.execute(*args, **kwargs)
                s1 = clock()
                ref.get()
                drv.append((i, wstep, s0, s1))
                drv.append((i, rstep, s1, clock()))
            recs = ray_get([h.__ray_call__.remote(worker.fetch_profile, self._token)
                             for h in self._handles], 30.0, self._procs, "report timings")
        finally:
            self._swap(False)
        records = {DRIVER: drv}
        records.update({a.id: r for a, r in zip(self._ir.actors, recs)})
        self._last_profile = Profile(sched, records)
        return self._last_profile

    def _profile_sources(self) -> list:
        """The profiling variant of every actor's module, rendered on first use."""
        if self._profiled_sources is None:
            from dagc.codegen import render_actor
            self._profiled_sources = [
                render_actor(self._ir, self.schedule, a.id, self._origin, profile=True).source
                for a in self._ir.actors]
        return self._profiled_sources

    def _swap(self, profile: bool) -> None:
        """Park every loop, have it rebind to the (un)profiled module, resume."""
        from dagc.errors import DagcError
        self._control.words[C_STATE] = SWAP
        try:
            sources = self._profile_sources() if profile else [None] * len(self._handles)
            ok = ray_get([h.__ray_call__.remote(worker.swap, self._token, src)
                          for h, src in zip(self._handles, sources)], 30.0, self._procs, "switch loops")
        finally:
            self._control.words[C_STATE] = ch.RUNNING
            ray_get([h.__ray_call__.remote(worker.resume, self._token) for h in self._handles],
                    30.0, self._procs, "resume after the switch")
        if not all(ok):
            raise DagcError("an actor loop did not pause to switch its profiling mode")


"""Per-op timings: switch every loop to its profiling variant, run, switch back.

The profiling variant of each actor's module (timing calls compiled in) comes from the
layer that generated the modules, as a callable (``profile_sources``): the runtime never
renders code itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dagc.errors import DagcError
from dagc.ir import DRIVER
from dagc.runtime.actor import lifecycle
from dagc.runtime.channels.control import C_STATE, RUNNING, SWAP
from dagc.runtime.driver.calls import ray_get
from dagc.schedule import Kind

if TYPE_CHECKING:
    from dagc.ir import IR
    from dagc.runtime.driver.executions import Executions
    from dagc.runtime.driver.session import Session
    from dagc.schedule import Schedule
    from dagc.schedule.costs import Costs, Timing

# one op run: (execution, schedule step, start ns, end ns), as the loops record it
Record = tuple[int, int, int, int]

# how long profile() waits for one execution when the compile set no get_timeout: a
# profiled DAG that stops is reported, not waited on forever
PROFILE_GET_TIMEOUT = 300.0


class Profile:
    """Per-op timings of ``n`` executions (``cg.profile(n)``).

    ``str()`` / :meth:`summary`: per-op statistics and a critical path; :meth:`trace`: the
    Chrome trace (``dump`` writes it as trace.json); :meth:`costs`: what each action costs,
    for ``dagc.compile(dag, costs=profile)``; :meth:`timing`: predicted vs measured per
    action (``cg.schedule`` shows it after a profile). ``records``: the raw records,
    ``{process: [(execution, step, start_ns, end_ns), ...]}``.
    """

    def __init__(self, schedule: Schedule, records: dict[str, list[Record]]):
        self.schedule = schedule
        self.records = records
        self._costs: Costs | None = None

    @property
    def executions(self) -> int:
        """How many executions were profiled."""
        return len({r[0] for r in self.records.get(DRIVER, ())})

    def costs(self) -> Costs:
        """Each action's cost by this profile (medians, µs): a ``dagc.schedule.Costs`` that
        ``dagc.compile(dag, costs=...)`` takes (so does the Profile itself)."""
        if self._costs is None:  # a compile asks for them once per pass
            from dagc.inspect.profile_stats import measured_costs

            self._costs = measured_costs(self.schedule, self.records)
        return self._costs

    def timing(self) -> Timing:
        """The schedule's predicted timing (from the compile's costs) with this profile's
        measured one beside it (medians, µs from each execution's input write)."""
        from dagc.inspect.profile_stats import measured_timing
        from dagc.schedule.costs import Timing

        base = self.schedule.timing or Timing(predicted={})
        return base.with_measured(
            measured_timing(self.schedule, self.records),
            f"median of {self.executions} profiled executions",
        )

    def summary(self) -> str:
        from dagc.inspect.profile_stats import summary

        return summary(self.schedule, self.records)

    def to_dict(self) -> dict[str, Any]:
        from dagc.inspect.profile_stats import summary_dict

        return summary_dict(self.schedule, self.records)

    def trace(self) -> dict[str, Any]:
        """The Chrome trace-event JSON (one track per process, one span per op; ``ts`` in µs,
        ``args.execution`` the execution index): Perfetto / chrome://tracing open it."""
        from dagc.inspect.timeline import timeline_json

        return timeline_json(self.schedule, self.records)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.records.values())
        return f"<dagc.Profile {n} op records over {len(self.records)} processes>"


class Profiler:
    """Runs profiled executions of one DAG; keeps the last :class:`Profile`.

    ``profile_sources()`` returns the profiling variant of every actor's module, in the
    order of ``ir.actors``; it is called once, on the first profile.
    """

    def __init__(
        self,
        session: Session,
        runs: Executions,
        ir: IR,
        profile_sources: Callable[[], Iterable[str]] | None = None,
    ):
        self._session = session
        self._runs = runs
        self._ir = ir
        self._profile_sources = profile_sources
        self._sources: list[str] | None = None
        self.last: Profile | None = None
        self.schedule = ir.schedule  # with the last profile's measured timing

    def run(self, n: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Profile:
        runs = self._runs
        if runs.closed or runs.dead:
            runs._raise_closed()
        if runs.pending:
            raise DagcError(
                "profile() needs every earlier execution fetched first; call "
                "get() on the pending DagRefs."
            )
        sched = self._ir.schedule
        wstep = next((e.step for e in sched.of(DRIVER) if e.action.kind is Kind.SEND), 0)
        rstep = max((e.step for e in sched.of(DRIVER) if e.action.kind is Kind.RECV), default=0)
        s = self._session
        timeout = runs._get_timeout or PROFILE_GET_TIMEOUT
        self._swap(True)
        drv: list[Record] = []
        try:
            clock = time.monotonic_ns
            execute = runs.execute
            for i in range(n):
                s0 = clock()
                ref = execute(*args, **kwargs)
                s1 = clock()
                ref.get(timeout=timeout)  # a hang becomes a DagTimeoutError
                drv.append((i, wstep, s0, s1))
                drv.append((i, rstep, s1, clock()))
        finally:
            # a DAG that died (or was torn down) meanwhile has no loops to switch back and
            # its control is released: the error that ended it is the one to see
            if not (runs.dead or runs.closed):
                self._swap(False)
        # after the swap back: every loop parked at the end of an execution, so the last
        # one's records are complete (a loop records an op after it ran it)
        recs = ray_get(
            [h.__ray_call__.remote(lifecycle.fetch_profile, s.token) for h in s.handles],
            30.0,
            s.procs,
            "report timings",
        )
        records = {DRIVER: drv}
        records.update({a.id: r for a, r in zip(self._ir.actors, recs)})
        self.last = Profile(sched, records)
        self.schedule = replace(sched, timing=self.last.timing())
        return self.last

    def _variants(self) -> list[str]:
        if self._sources is None:
            if self._profile_sources is None:
                raise DagcError(
                    "this compiled DAG was loaded without its profiling "
                    "variants; compile it with dagc.compile() to profile it."
                )
            self._sources = list(self._profile_sources())
        return self._sources

    def _swap(self, profile: bool) -> None:
        """Park every loop, have it rebind to the (un)profiled module, resume."""
        s = self._session
        control = s.control
        assert control is not None  # the session started before its Profiler was made
        control.words[C_STATE] = SWAP
        try:
            sources: Sequence[str | None] = self._variants() if profile else [None] * len(s.handles)
            ok = ray_get(
                [
                    h.__ray_call__.remote(lifecycle.swap, s.token, src)
                    for h, src in zip(s.handles, sources)
                ],
                30.0,
                s.procs,
                "switch loops",
            )
        finally:
            control.words[C_STATE] = RUNNING
            ray_get(
                [h.__ray_call__.remote(lifecycle.resume, s.token) for h in s.handles],
                30.0,
                s.procs,
                "resume after the switch",
            )
        if not all(ok):
            raise DagcError("an actor loop did not pause to switch its profiling mode")

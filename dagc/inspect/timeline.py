"""The timeline of a profile: per-op timing records matched to schedule actions (spans),
and those spans as Chrome trace-event JSON (Perfetto, chrome://tracing).

A loop compiled with profiling records, per actor, one tuple per executed action::

    (execution_index, step, t_start_ns, t_end_ns)       # time.monotonic_ns()

``records`` maps actor id ("a0", "driver") to that actor's list, in the order recorded.
The clock is shared by all processes of one node, so spans of different actors line up.

- :func:`match_spans` pairs each record with its action (a :class:`Span`);
  :func:`group_executions` groups spans by execution and says which are complete.
- :func:`timeline_json` turns them into Chrome trace-event JSON: one track per actor, one
  span per op. (The statistics over spans are :mod:`dagc.inspect.profile_stats`.)
"""

from __future__ import annotations

from dataclasses import dataclass

from dagc.ir import DRIVER
from dagc.schedule import OP_KINDS, Action, Schedule

PID = 1


@dataclass(frozen=True)
class Span:
    """One recorded action: which one, in which execution, and when."""

    actor: str
    execution: int
    step: int
    index: int  # position in the actor's action list; -1 if unmatched
    action: Action | None
    start_ns: int
    end_ns: int

    @property
    def name(self) -> str:
        return op_name(self.action) if self.action is not None else f"step {self.step}"

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns


def op_name(action: Action) -> str:
    """The span name of an action: the method for calls (``fwd``), else ``recv t2<a0``."""
    return action.method if action.kind in OP_KINDS else str(action)


def actor_order(schedule: Schedule, records: dict) -> list[str]:
    """Schedule columns first, then any recorded actor the schedule does not name."""
    return list(schedule.actors) + sorted(a for a in records if a not in schedule.actors)


def match_spans(schedule: Schedule, records: dict) -> list[Span]:
    """Pair each record with its action; spans ordered by actor column, execution, start.

    Within one execution an actor's records come in program order, so the k-th record
    with step s is the k-th action at step s (several actions may share a step).
    """
    spans = []
    for actor in actor_order(schedule, records):
        acts = schedule.of(actor)
        at_step: dict[int, list[int]] = {}
        for i, (step, _) in enumerate(acts):
            at_step.setdefault(step, []).append(i)
        used: dict[tuple[int, int], int] = {}  # (execution, step) -> records matched
        for rec in records.get(actor, ()):
            n, step, t0, t1 = (int(x) for x in rec[:4])
            k = used.get((n, step), 0)
            used[(n, step)] = k + 1
            candidates = at_step.get(step, [])
            idx = candidates[k] if k < len(candidates) else -1
            spans.append(Span(actor, n, step, idx, acts[idx].action if idx >= 0 else None, t0, t1))
    order = {a: i for i, a in enumerate(actor_order(schedule, records))}
    spans.sort(key=lambda s: (order[s.actor], s.execution, s.start_ns, s.index))
    return spans


def us(ns: float) -> float:
    return round(ns / 1000.0, 3)


# -- Chrome trace-event JSON ---------------------------------------------------------------


def timeline_json(schedule: Schedule, records: dict) -> dict:
    """Chrome trace-event JSON, object form, for Perfetto / chrome://tracing::

        {"traceEvents": [
            {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "dagc"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "a0:Stage"}},
            {"ph": "X", "name": "fwd", "cat": "call", "pid": 1, "tid": 2,
             "ts": 12.5, "dur": 3.25,
             "args": {"execution": 0, "step": 2, "value": "t0", "op": "t0 = fwd($0)"}},
            ...],
         "displayTimeUnit": "ns"}

    One track (tid) per actor in schedule column order; timestamps in microseconds from
    the earliest record.
    """
    spans = match_spans(schedule, records)
    t0 = min((s.start_ns for s in spans), default=0)
    events: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "dagc"}}
    ]
    tids = {}
    for i, actor in enumerate(actor_order(schedule, records)):
        if actor not in records:
            continue
        tids[actor] = i + 1
        label = schedule.label(actor)
        events.append(
            {"ph": "M", "name": "thread_name", "pid": PID, "tid": i + 1, "args": {"name": label}}
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": PID,
                "tid": i + 1,
                "args": {"sort_index": i},
            }
        )
    for s in spans:
        a = s.action
        events.append(
            {
                "ph": "X",
                "name": s.name,
                "cat": a.kind.value if a else "unknown",
                "pid": PID,
                "tid": tids[s.actor],
                "ts": us(s.start_ns - t0),
                "dur": us(s.dur_ns),
                "args": {
                    "execution": s.execution,
                    "step": s.step,
                    "value": str(a.value) if a else "",
                    "op": schedule.detail(s.actor, a) if a else "",
                },
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def group_executions(schedule: Schedule, spans: list[Span]) -> tuple[dict, list[int]]:
    """(execution -> its spans, the executions every recorded actor finished)."""
    by_exec: dict[int, list[Span]] = {}
    for s in spans:
        by_exec.setdefault(s.execution, []).append(s)
    actors = sorted({s.actor for s in spans})
    want = {a: recorded_per_execution(schedule, a) for a in actors}
    complete = []
    for n, ss in sorted(by_exec.items()):
        counts = {a: 0 for a in actors}
        for s in ss:
            counts[s.actor] += 1
        if all(counts[a] >= want[a] for a in actors):
            complete.append(n)
    return by_exec, complete


def recorded_per_execution(schedule: Schedule, actor: str) -> int:
    """How many records one execution leaves for ``actor``: one per action of an actor's
    column; the driver records its input write and its last output read only (a
    MultiOutputNode's driver column has a read per output: counting those, no execution
    was ever complete)."""
    col = schedule.of(actor)
    if actor == DRIVER:
        return min(len(col), 2)
    return len(col)

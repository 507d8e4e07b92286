"""overlap: Schedule -> Schedule where communicator receives are issued early.

Rule: each ``crecv v`` becomes ``icrecv v`` hoisted up to just after the previous
communicator op of the same process (so the issue order of communicator ops is unchanged
and the deadlock proof still holds), plus ``wait v`` just before v's first use; each
``csend v`` becomes ``isend v`` in place plus ``wait v`` at the end of the execution (the
buffer stays alive until then). The simulator re-checks the result.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from dagc.ir import IR
from dagc.passes import Pass, PassContext
from dagc.passes.simulate import simulate
from dagc.schedule import (CALL, COLL, COMM_KINDS, CRECV, CSEND, ICRECV, ISEND, WAIT, WRITE,
                           Action, Schedule)


def _uses(a: Action, value: str) -> bool:
    if a.kind in (CALL, COLL):
        refs = list(a.args) + [v for _, v in a.kwargs]
        return any(r == value or r.split(".", 1)[0] == value for r in refs)
    if a.kind == WRITE:
        return a.value == value
    return False


def overlap_actions(acts: tuple[Action, ...]) -> tuple[Action, ...]:
    out: list[Action] = []
    last_comm = -1                          # index in `out` of the last communicator op
    pending_sends: list[Action] = []
    for a in acts:
        if a.kind == CRECV:
            issue = replace(a, kind=ICRECV)
            out.insert(last_comm + 1, issue)
            last_comm += 1
            # wait goes just before the first use, found later
            out.append(replace(a, kind=WAIT, peers=(), channel=a.channel))
            continue
        if a.kind == CSEND:
            pending_sends.append(a)
            a = replace(a, kind=ISEND)
        out.append(a)
        if a.kind in COMM_KINDS:
            last_comm = len(out) - 1
    # move each receive's wait just before the first use of its value
    result: list[Action] = []
    waits = [w for w in out if w.kind == WAIT]
    body = [x for x in out if x.kind != WAIT]
    placed = set()
    for x in body:
        for w in waits:
            if id(w) not in placed and _uses(x, w.value):
                result.append(replace(w, step=x.step))
                placed.add(id(w))
        result.append(x)
    for w in waits:
        if id(w) not in placed:
            result.append(w)
    last = result[-1].step if result else 0
    for s in pending_sends:
        result.append(replace(s, kind=WAIT, peers=(), step=last))
    return tuple(result)


def overlap(sched: Schedule) -> Schedule:
    return replace(sched, actions={p: overlap_actions(sched.of(p)) for p in sched.actors})


@dataclass(frozen=True)
class OverlapComm(Pass):
    name: ClassVar[str] = "overlap"

    def run(self, ir: IR, ctx: PassContext) -> IR:
        sched = overlap(ir.schedule)
        steps = simulate(sched)
        return ir.replace(schedule=replace(sched, simulated_steps=steps))

"""overlap: Schedule -> Schedule where communicator receives are issued early.

Rule: each ``crecv v<w`` becomes ``icrecv v<w`` hoisted up to just after the previous
communicator op of the same process (so the issue order of communicator ops is unchanged
and the deadlock proof still holds), plus ``wait v<w`` (kind wait_recv: waits on that one
receive and assigns v) just before v's first use; each ``csend v>r`` becomes ``isend v>r``
in place, and one ``wait v>r1,r2`` (kind wait_send: waits on the sends of v to exactly those
readers) per value and channel goes at the end of the execution (the buffer stays alive
until then). Every wait names what it waits for, so code generation guesses nothing. The
simulator re-checks the result, waits included.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from dagc.ir import IR
from dagc.passes.base import Pass, PassContext
from dagc.passes.simulate import simulate
from dagc.schedule import (CALL, COLL, COMM_KINDS, CRECV, CSEND, ICRECV, ISEND, WAIT_RECV,
                           WAIT_SEND, WRITE, Action, Schedule)


def _uses(a: Action, value: str) -> bool:
    if a.kind in (CALL, COLL):
        refs = list(a.args) + [v for _, v in a.kwargs]
        return any(r == value or r.split(".", 1)[0] == value for r in refs)
    if a.kind == WRITE:
        return a.value == value
    return False


def overlap_actions(acts: tuple[Action, ...]) -> tuple[Action, ...]:
    body: list[Action] = []
    last_comm = -1                          # index in `body` of the last communicator op
    recv_waits: list[Action] = []           # one wait_recv per hoisted receive
    sends: dict[tuple[str, str], list[str]] = {}   # (value, channel) -> peers, issue order
    for a in acts:
        if a.kind == CRECV:
            body.insert(last_comm + 1, replace(a, kind=ICRECV))
            last_comm += 1
            recv_waits.append(replace(a, kind=WAIT_RECV))
            continue
        if a.kind == CSEND:
            sends.setdefault((a.value, a.channel), []).extend(a.peers)
            a = replace(a, kind=ISEND)
        body.append(a)
        if a.kind in COMM_KINDS:
            last_comm = len(body) - 1
    # each receive's wait goes just before the first use of its value
    result: list[Action] = []
    pending = list(recv_waits)
    for x in body:
        for w in [w for w in pending if _uses(x, w.value)]:
            result.append(replace(w, step=x.step))
            pending.remove(w)
        result.append(x)
    result.extend(pending)
    last = result[-1].step if result else 0
    for (value, channel), peers in sends.items():
        actor = acts[0].actor
        result.append(Action(step=last, actor=actor, kind=WAIT_SEND, value=value,
                             peers=tuple(peers), channel=channel))
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

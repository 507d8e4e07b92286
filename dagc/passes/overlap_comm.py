"""overlap-comm: Schedule -> Schedule where communicator receives are issued early.

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

from dagc.ir import IR, Ref
from dagc.passes.base import Pass, PassContext
from dagc.schedule import COMM_KINDS, Action, Entry, Kind, Schedule
from dagc.schedule.simulate import comm_order, run, timing_of


def _uses(sched: Schedule, a, value: Ref) -> bool:
    """Whether action ``a`` reads ``value`` (a call taking it or an element of it, a write)."""
    if a.kind in (Kind.CALL, Kind.COLL):
        return any(
            r == value or (value.index is None and isinstance(r, Ref) and r.op == value.op)
            for r in sched.call(a.value).refs()
        )
    if a.kind == Kind.SEND:
        return a.value == value
    return False


def overlap_actions(sched: Schedule, actor: str) -> tuple[Entry, ...]:
    body: list[Entry] = []
    last_comm = -1  # index in `body` of the last communicator op
    recv_waits: list[Entry] = []  # one wait_recv per hoisted receive
    sends: dict[tuple[Ref, str], list[str]] = {}  # (value, channel id) -> peers, issue order
    for step, a in sched.of(actor):
        if a.kind == Kind.CRECV:
            # hoisted to just after the last communicator op, it takes the step of the entry
            # it lands after (or of the column's first), so every column's steps stay in order
            at = last_comm + 1
            moved = body[last_comm].step if last_comm >= 0 else body[0].step if body else step
            body.insert(at, Entry(moved, replace(a, kind=Kind.ICRECV)))
            last_comm = at
            recv_waits.append(Entry(step, replace(a, kind=Kind.WAIT_RECV)))
            continue
        if a.kind == Kind.CSEND:
            cid = sched.channel_of(actor, a).id
            sends.setdefault((a.value, cid), []).extend(a.peers)
            a = replace(a, kind=Kind.ISEND)
        body.append(Entry(step, a))
        if a.kind in COMM_KINDS:
            last_comm = len(body) - 1
    # each receive's wait goes just before the first use of its value
    result: list[Entry] = []
    pending = list(recv_waits)
    for step, x in body:
        for w in [w for w in pending if _uses(sched, x, w.action.value)]:
            result.append(Entry(step, w.action))
            pending.remove(w)
        result.append(Entry(step, x))
    result.extend(pending)
    last = result[-1].step if result else 0
    for (value, _), peers in sends.items():
        result.append(Entry(last, Action(Kind.WAIT_SEND, value, peers=tuple(peers))))
    return tuple(result)


def overlap(sched: Schedule) -> Schedule:
    return replace(sched, actions={p: overlap_actions(sched, p) for p in sched.actors})


@dataclass(frozen=True)
class OverlapComm(Pass):
    name: ClassVar[str] = "overlap-comm"
    requires: ClassVar[frozenset[str]] = frozenset({"schedule", "comm-groups"})
    ensures: ClassVar[frozenset[str]] = frozenset({"overlapped"})

    def run(self, ir: IR, ctx: PassContext) -> IR:
        sched = overlap(ir.schedule)
        costs = ctx.costs
        result = run(sched, 2, comm_order(ir), costs)
        return ir.replace(
            schedule=replace(
                sched, simulated_steps=result.rounds, timing=timing_of(sched, result, costs)
            )
        )

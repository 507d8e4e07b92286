"""A dry-run of a Schedule: proves it terminates (or raises DeadlockError) and, from
per-action costs, predicts when each action runs.

Semantics modelled (what the runtime does):

- shared-memory/TCP channels are rings of ``slots`` messages: a read waits for a write, a
  write waits while the ring is full;
- every communicator op (csend, crecv, coll, isend, icrecv) enters a *lane* of its process,
  and a lane runs in order: the op at its head completes only when every participant has
  the matching op at the head of its own lane. Which lane (:class:`CommOrder`): one per
  process for NCCL and custom communicators (one CUDA stream runs every op of a process in
  issue order; the runtime posts a process's deferred receives in issue order); for gloo,
  which matches messages per (peer, tag), one per communicator, peer and direction for
  sends and receives and one per communicator for collectives (the runtime posts a deferred
  receive behind earlier ones from the same peer only);
- csend, crecv and coll wait for their own completion; isend/icrecv do not: a
  ``wait v<w`` (wait_recv) waits for this execution's ``icrecv v<w`` to complete, a
  ``wait v>r1,r2`` (wait_send) for its ``isend v>r1`` and ``isend v>r2``.

Before running, every column is checked to wait exactly once on each op it issues, and
only on ops it issued earlier in the same execution (otherwise a value would never be
bound, or a wait would never end).

Several executions are simulated back to back, the driver submitting the next once it has
read every output of the last (as ``execute(x).get()`` in a loop, and ``cg.profile``, do),
so cross-execution ring pressure counts. The number of rounds is the schedule's simulated
length (a test metric, :func:`simulate`).

Time (:func:`predict`): a process's clock advances by each action's cost
(:class:`~dagc.schedule.costs.Costs`); a read ends its cost after the write it reads
ended (a write, its cost after the slot it fills is free); a rendezvous of communicator
ops completes the transfer's cost after the last participant issued its op and each lane's
previous op completed; a blocking op ends then, a wait ends its cost after what it waits
for completed. A deferred receive counts as posted when issued (the runtime posts it when
its metadata is there and the process next touches the communicator, or at its wait).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from dagc.errors import DeadlockError
from dagc.ir import DRIVER, IR
from dagc.schedule import COMM_KINDS, Kind, Schedule
from dagc.schedule.check import wait_problems
from dagc.schedule.costs import Costs, Span, Timing

CALL, COLL, RECV, SEND = Kind.CALL, Kind.COLL, Kind.RECV, Kind.SEND
CSEND, CRECV, ISEND, ICRECV = Kind.CSEND, Kind.CRECV, Kind.ISEND, Kind.ICRECV
WAIT_RECV, WAIT_SEND = Kind.WAIT_RECV, Kind.WAIT_SEND
_BLOCKING = (CSEND, CRECV, COLL)
_QUEUED = COMM_KINDS


@dataclass(frozen=True)
class CommOrder:
    """Which communicator groups match point-to-point messages per peer (gloo), and the
    communicator group of each collective ("g0" -> "k1"). The default, nothing per peer,
    is the strictest order: every communicator op of a process in one lane."""

    per_peer: frozenset = frozenset()
    collectives: Mapping[str, str] = field(default_factory=dict)


def comm_order(ir: IR) -> CommOrder:
    """The order the runtime keeps for ``ir``'s communicators: per peer for gloo groups
    (``GlooCommunicator.per_peer_order``), one stream per process otherwise."""
    return CommOrder(
        per_peer=frozenset(g.id for g in ir.comm_groups if g.backend == "gloo"),
        collectives=dict(ir.collectives),
    )


def _match_key(proc: str, a) -> tuple:
    """Two queued ops rendezvous when their keys are equal."""
    if a.kind in (CSEND, ISEND):
        return ("p2p", a.value, proc, a.peers[0])
    if a.kind in (CRECV, ICRECV):
        return ("p2p", a.value, a.peers[0], proc)
    return ("coll", a.group)


def _participants(sched: Schedule, a, proc: str) -> frozenset:
    if a.kind == COLL:
        return frozenset(
            p for p in sched.actors for _, x in sched.of(p) if x.kind == COLL and x.group == a.group
        )
    return frozenset((proc, a.peers[0]))


def _lane(sched: Schedule, order: CommOrder, proc: str, a) -> tuple:
    if not order.per_peer:
        return (proc,)
    if a.kind == COLL:
        k = order.collectives.get(a.group, "")
        return (proc, k) if k in order.per_peer else (proc,)
    k = sched.channel_of(proc, a).communicator
    if k not in order.per_peer:
        return (proc,)
    return (proc, k, a.peers[0], ">" if a.kind in (CSEND, ISEND) else "<")


def _handle(proc: str, a, execution: int, peer: str) -> tuple:
    """The key of the issued op a wait refers to: direction, value and peer."""
    send = a.kind in (ISEND, WAIT_SEND)
    return (proc, execution, "send" if send else "recv", a.value, peer)


def check_waits(sched: Schedule) -> None:
    """Each column waits once on every op it issues, after issuing it; DeadlockError if not."""
    mark = {(p, step): problem for p, step, problem in wait_problems(sched)}
    if mark:
        raise DeadlockError(
            "the schedule's waits do not match the communicator ops it issues: a value "
            "would never be bound, or a wait would never end. This is a dagc bug; please "
            "report it with the DAG.",
            sched.table(mark),
        )


class _Entry:
    """A communicator op in its lane."""

    __slots__ = ("key", "parts", "lane", "proc", "action", "issued", "ready", "done", "end")

    def __init__(self, key, parts, lane, proc, action, issued):
        self.key, self.parts, self.lane = key, parts, lane
        self.proc, self.action = proc, action
        self.issued = issued  # the process's clock when it issued the op
        self.ready = issued  # when it may start: issued, lane's previous done
        self.done = False
        self.end = 0.0


@dataclass(frozen=True)
class Run:
    """What a simulation found: its rounds, and every action's (start, end) by
    (process, position in the process's program of ``executions`` columns)."""

    rounds: int
    times: dict
    executions: int


def run(
    sched: Schedule, executions: int = 2, order: CommOrder | None = None, costs: Costs | None = None
) -> Run:
    """Simulate ``executions`` executions; DeadlockError if they cannot all complete."""
    check_waits(sched)
    order = order or CommOrder()
    costs = costs or Costs.uniform()
    procs = [p for p in sched.actors if sched.of(p)]
    # per process: (step, action, channel id of a RECV/SEND, cost, lane of a comm op; ()
    # for an action in no lane)
    prog = {}
    for p in procs:
        col = []
        for s, a in sched.of(p):
            cid = sched.channel_of(p, a).id if a.kind in (RECV, SEND) else ""
            lane = _lane(sched, order, p, a) if a.kind in _QUEUED else ()
            col.append((s, a, cid, costs.of_action(p, a), lane))
        prog[p] = col * executions
    size = {p: len(sched.of(p)) for p in procs}
    pc = {p: 0 for p in procs}
    clock = {p: 0.0 for p in procs}
    times: dict = {}
    slots = {c.id: max(1, c.slots) for c in sched.channels}
    readers = {c.id: c.readers for c in sched.channels}
    written = {c.id: 0 for c in sched.channels}
    read = {(c.id, r): 0 for c in sched.channels for r in c.readers}
    write_end: dict = {}  # (channel, message) -> time
    read_end: dict = {}  # (channel, reader, message) -> time
    lanes: dict[tuple, deque] = {}
    lane_done: dict[tuple, float] = {}  # lane -> when its last op completed
    issued: dict[tuple, _Entry] = {}  # (proc, pc) / _handle() -> entry
    parts_cache: dict = {}
    rounds = 0
    while True:
        progressed = False
        # 1. lanes: complete every head op whose participants all have it at a lane's head
        heads: dict[tuple, list] = {}
        for q in lanes.values():
            if q:
                heads.setdefault(q[0].key, []).append(q[0])
        for es in heads.values():
            if {e.proc for e in es} != es[0].parts:
                continue
            start = max(max(e.ready, lane_done.get(e.lane, 0.0)) for e in es)
            end = start + _rendezvous_cost(costs, es)
            for e in es:
                e.done, e.end = True, end
                lane_done[e.lane] = end
                lanes[e.lane].popleft()
            progressed = True
        # 2. each process runs its next actions while it can
        for p in procs:
            col = prog[p]
            while pc[p] < len(col):
                i = pc[p]
                _, a, cid, cost, lane = col[i]
                t = clock[p]
                k = a.kind
                if k == RECV:
                    n = read[(cid, p)]
                    if written[cid] <= n:
                        break
                    read[(cid, p)] = n + 1
                    end = max(t, write_end[(cid, n)]) + cost
                    read_end[(cid, p, n)] = end
                elif k == SEND:
                    n = written[cid]
                    if n - min(read[(cid, r)] for r in readers[cid]) >= slots[cid]:
                        break
                    free = (
                        max((read_end[(cid, r, n - slots[cid])] for r in readers[cid]), default=0.0)
                        if n >= slots[cid]
                        else 0.0
                    )
                    written[cid] = n + 1
                    end = max(t, free) + cost
                    write_end[(cid, n)] = end
                elif k in _QUEUED:
                    e = issued.get((p, i))
                    if e is None:
                        ex = i // size[p]
                        pk = (k, a.group, p, a.peers)
                        parts = parts_cache.get(pk)
                        if parts is None:
                            parts = parts_cache[pk] = _participants(sched, a, p)
                        blocking = k in _BLOCKING
                        e = _Entry(
                            (_match_key(p, a), ex), parts, lane, p, a, t if blocking else t + cost
                        )
                        lanes.setdefault(lane, deque()).append(e)
                        issued[(p, i)] = e
                        if not blocking:
                            issued[_handle(p, a, ex, a.peers[0])] = e
                        progressed = True
                    if k in _BLOCKING:
                        if not e.done:
                            break
                        end = max(t, e.end)
                    else:
                        end = t + cost
                elif k in (WAIT_RECV, WAIT_SEND):
                    ex = i // size[p]
                    es = [issued[_handle(p, a, ex, q)] for q in a.peers]
                    if not all(e.done for e in es):
                        break
                    end = max(t, max(e.end for e in es)) + cost
                elif k == CALL:
                    end = t + cost
                else:
                    raise AssertionError(f"unknown action kind {k}")
                times[(p, i)] = (t, end)
                clock[p] = end
                pc[p] = i + 1
                progressed = True
        rounds += 1
        if all(pc[p] == len(prog[p]) for p in procs) and not any(lanes.values()):
            return Run(rounds, times, executions)
        if not progressed:
            mark = {}
            for p in procs:
                if pc[p] < len(prog[p]):
                    step, a = prog[p][pc[p]][:2]
                    mark[(p, step)] = f"stuck ({_why(a, p)})"
            raise DeadlockError(
                "the schedule can deadlock: the marked ops wait on each other forever. "
                "Communicator ops must be issued in the same relative order by every "
                "participant.",
                sched.table(mark),
            )


def _rendezvous_cost(costs: Costs, es: list) -> float:
    a = es[0].action
    if a.kind == COLL:
        return max(costs.of_action(e.proc, e.action) for e in es)
    recv = next((e for e in es if e.action.kind in (CRECV, ICRECV)), es[0])
    return costs.of_transfer(recv.proc, a.value, recv.action.peers[0])


def simulate(sched: Schedule, executions: int = 2, order: CommOrder | None = None) -> int:
    """The schedule's simulated length in rounds; DeadlockError if it can get stuck."""
    return run(sched, executions, order).rounds


def predict(
    sched: Schedule, costs: Costs | None = None, order: CommOrder | None = None, executions: int = 2
) -> Timing:
    """When each action of an execution runs, from ``costs``: the last of ``executions``
    simulated back to back, relative to the driver's write of its input."""
    costs = costs or Costs.uniform()
    r = run(sched, executions, order, costs)
    return timing_of(sched, r, costs)


def timing_of(sched: Schedule, r: Run, costs: Costs) -> Timing:
    last = r.executions - 1
    drv = sched.of(DRIVER)
    t0 = r.times[(DRIVER, last * len(drv))][0] if drv else 0.0
    out: dict[str, tuple[Span | None, ...]] = {}
    times = r.times
    for p in sched.actors:
        n = len(sched.of(p))
        base = last * n
        spans: list[Span | None] = []
        for i in range(n):
            s = times.get((p, base + i))
            # times as printed and compared: a few digits, so equal inputs give equal bytes
            spans.append((round(s[0] - t0, 3), round(s[1] - t0, 3)) if s else None)
        out[p] = tuple(spans)
    return Timing(predicted=out, unit=costs.unit, source=costs.source)


def _why(a, p) -> str:
    if a.kind == RECV:
        return f"waits for {a.value} from {a.peers[0]}"
    if a.kind == SEND:
        return "ring full"
    if a.kind == COLL:
        return f"waits for all of {a.group}"
    if a.kind in (CSEND, ISEND):
        return f"waits for {a.peers[0]} to receive {a.value}"
    if a.kind in (CRECV, ICRECV, WAIT_RECV):
        return f"waits for {a.peers[0]} to send {a.value}"
    if a.kind == WAIT_SEND:
        return f"waits for {','.join(a.peers)} to receive {a.value}"
    return f"waits for {a.value}"

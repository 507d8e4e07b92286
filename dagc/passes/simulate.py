"""A dry-run of a Schedule that proves it terminates or raises DeadlockError.

Semantics modelled (the strictest of the transports dagc uses):

- shared-memory/TCP channels are rings of ``slots`` messages: a read waits for a write, a
  write waits while the ring is full;
- every communicator op (csend, crecv, coll, isend, icrecv) enters its process's comm queue
  and the queue runs in order, as NCCL runs one CUDA stream: the op at the head completes
  only when every participant has the matching op at the head of its own queue;
- csend, crecv and coll wait for their own completion; isend/icrecv do not: a
  ``wait v<w`` (wait_recv) waits for this execution's ``icrecv v<w`` to complete, a
  ``wait v>r1,r2`` (wait_send) for its ``isend v>r1`` and ``isend v>r2``.

Before running, every column is checked to wait exactly once on each op it issues, and
only on ops it issued earlier in the same execution (otherwise a value would never be
bound, or a wait would never end).

Several executions are simulated back to back, so cross-execution ring pressure counts.
The returned number of rounds is the schedule's simulated length (a test metric).
"""
from __future__ import annotations

from collections import deque

from dagc.errors import DeadlockError
from dagc.schedule import COMM_KINDS, Kind, Schedule
from dagc.schedule.check import wait_problems

CALL, COLL, READ, WRITE = Kind.CALL, Kind.COLL, Kind.READ, Kind.WRITE
CSEND, CRECV, ISEND, ICRECV = Kind.CSEND, Kind.CRECV, Kind.ISEND, Kind.ICRECV
WAIT_RECV, WAIT_SEND = Kind.WAIT_RECV, Kind.WAIT_SEND
_BLOCKING = (CSEND, CRECV, COLL)
_QUEUED = COMM_KINDS


def _match_key(proc: str, a) -> tuple:
    """Two queued ops rendezvous when their keys are equal."""
    if a.kind in (CSEND, ISEND):
        return ("p2p", a.value, proc, a.peers[0])
    if a.kind in (CRECV, ICRECV):
        return ("p2p", a.value, a.peers[0], proc)
    return ("coll", a.group)


def _participants(sched: Schedule, a, proc: str) -> set:
    if a.kind == COLL:
        return {p for p in sched.actors for _, x in sched.of(p)
                if x.kind == COLL and x.group == a.group}
    return {proc, a.peers[0]}


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
            "report it with the DAG.", sched.table(mark))


def simulate(sched: Schedule, executions: int = 2) -> int:
    check_waits(sched)
    procs = [p for p in sched.actors if sched.of(p)]
    # per process: (step, action, channel id of a READ/WRITE), for `executions` rounds
    prog = {p: [(s, a, sched.channel_of(p, a).id if a.kind in (READ, WRITE) else "")
                for s, a in sched.of(p)] * executions for p in procs}
    pc = {p: 0 for p in procs}
    slots = {c.id: max(1, c.slots) for c in sched.channels}
    readers = {c.id: c.readers for c in sched.channels}
    written = {c.id: 0 for c in sched.channels}
    read = {(c.id, r): 0 for c in sched.channels for r in c.readers}
    queue = {p: deque() for p in procs}          # entries: [key, participants, done, value]
    issued: dict[tuple, list] = {}                # (proc, id, pc) / _handle() -> queue entry
    parts_cache: dict = {}
    rounds = 0
    while True:
        progressed = False
        # 1. comm queues: complete every head op whose participants all have it at the head
        heads = {p: queue[p][0] for p in procs if queue[p]}
        for p, e in list(heads.items()):
            if e[2]:
                continue
            if all(q in heads and heads[q][0] == e[0] for q in e[1]):
                for q in e[1]:
                    heads[q][2] = True
                    queue[q].popleft()
                progressed = True
        # 2. each process runs its next action if it can
        for p in procs:
            while pc[p] < len(prog[p]):
                _, a, cid = prog[p][pc[p]]
                entry = issued.get((p, id(a), pc[p]))
                if a.kind == READ:
                    if written[cid] <= read[(cid, p)]:
                        break
                    read[(cid, p)] += 1
                elif a.kind == WRITE:
                    lo = min(read[(cid, r)] for r in readers[cid])
                    if written[cid] - lo >= slots[cid]:
                        break
                    written[cid] += 1
                elif a.kind in _QUEUED:
                    if entry is None:
                        n = pc[p] // len(sched.of(p))
                        key = (_match_key(p, a), n)
                        pk = (a.kind, a.group, p, a.peers)
                        parts = parts_cache.get(pk)
                        if parts is None:
                            parts = parts_cache[pk] = _participants(sched, a, p)
                        entry = [key, parts, False, a.value]
                        queue[p].append(entry)
                        issued[(p, id(a), pc[p])] = entry
                        if a.kind in (ISEND, ICRECV):
                            issued[_handle(p, a, n, a.peers[0])] = entry
                        progressed = True
                    if a.kind in _BLOCKING and not entry[2]:
                        break
                elif a.kind in (WAIT_RECV, WAIT_SEND):
                    n = pc[p] // len(sched.of(p))
                    if not all(issued[_handle(p, a, n, q)][2] for q in a.peers):
                        break
                elif a.kind != CALL:
                    raise AssertionError(f"unknown action kind {a.kind}")
                pc[p] += 1
                progressed = True
        rounds += 1
        if all(pc[p] == len(prog[p]) for p in procs) and not any(queue.values()):
            return rounds
        if not progressed:
            mark = {}
            for p in procs:
                if pc[p] < len(prog[p]):
                    step, a, _ = prog[p][pc[p]]
                    mark[(p, step)] = f"stuck ({_why(a, p)})"
            raise DeadlockError(
                "the schedule can deadlock: the marked ops wait on each other forever. "
                "Communicator ops must be issued in the same relative order by every "
                "participant.", sched.table(mark))


def _why(a, p) -> str:
    if a.kind == READ:
        return f"waits for {a.value} from {a.peers[0]}"
    if a.kind == WRITE:
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

"""A dry-run of a Schedule that proves it terminates or raises DeadlockError.

Semantics modelled (the strictest of the transports dagc uses):

- shared-memory/TCP channels are rings of ``slots`` messages: a read waits for a write, a
  write waits while the ring is full;
- every communicator op (csend, crecv, coll, isend, icrecv) enters its process's comm queue
  and the queue runs in order, as NCCL runs one CUDA stream: the op at the head completes
  only when every participant has the matching op at the head of its own queue;
- csend, crecv and coll wait for their own completion; isend/icrecv do not, and
  ``wait v`` waits for the queued op that moves v.

Several executions are simulated back to back, so cross-execution ring pressure counts.
The returned number of rounds is the schedule's simulated length (a test metric).
"""
from __future__ import annotations

from collections import deque

from dagc.errors import DeadlockError
from dagc.schedule import (CALL, COLL, CRECV, CSEND, ICRECV, ISEND, READ, WAIT, WRITE,
                           Schedule)

_BLOCKING = (CSEND, CRECV, COLL)
_QUEUED = (CSEND, CRECV, COLL, ISEND, ICRECV)


def _match_key(proc: str, a) -> tuple:
    """Two queued ops rendezvous when their keys are equal."""
    if a.kind in (CSEND, ISEND):
        return ("p2p", a.value, proc, a.peers[0])
    if a.kind in (CRECV, ICRECV):
        return ("p2p", a.value, a.peers[0], proc)
    return ("coll", a.group)


def _participants(sched: Schedule, a, proc: str) -> set:
    if a.kind == COLL:
        return {p for p in sched.actors for x in sched.of(p) if x.kind == COLL and x.group == a.group}
    return {proc, a.peers[0]}


def simulate(sched: Schedule, executions: int = 2) -> int:
    procs = [p for p in sched.actors if sched.of(p)]
    prog = {p: list(sched.of(p)) * executions for p in procs}
    pc = {p: 0 for p in procs}
    slots = {c.id: max(1, c.slots) for c in sched.channels}
    readers = {c.id: c.readers for c in sched.channels}
    written = {c.id: 0 for c in sched.channels}
    read = {(c.id, r): 0 for c in sched.channels for r in c.readers}
    queue = {p: deque() for p in procs}          # entries: [key, participants, done, value]
    issued: dict[tuple[str, str], list] = {}      # (proc, value) -> latest queue entry
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
                a = prog[p][pc[p]]
                entry = issued.get((p, id(a), pc[p]))
                if a.kind == READ:
                    if written[a.channel] <= read[(a.channel, p)]:
                        break
                    read[(a.channel, p)] += 1
                elif a.kind == WRITE:
                    lo = min(read[(a.channel, r)] for r in readers[a.channel])
                    if written[a.channel] - lo >= slots[a.channel]:
                        break
                    written[a.channel] += 1
                elif a.kind in _QUEUED:
                    if entry is None:
                        key = (_match_key(p, a), pc[p] // len(sched.of(p)))
                        pk = (a.kind, a.group, p, a.peers)
                        parts = parts_cache.get(pk)
                        if parts is None:
                            parts = parts_cache[pk] = _participants(sched, a, p)
                        entry = [key, parts, False, a.value]
                        queue[p].append(entry)
                        issued[(p, id(a), pc[p])] = entry
                        issued[(p, "v", a.value)] = entry
                        progressed = True
                    if a.kind in _BLOCKING and not entry[2]:
                        break
                elif a.kind == WAIT:
                    e = issued.get((p, "v", a.value))
                    if e is not None and not e[2]:
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
                    a = prog[p][pc[p]]
                    mark[(p, a.step)] = f"stuck ({_why(a, p)})"
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
    if a.kind in (CRECV, ICRECV):
        return f"waits for {a.peers[0]} to send {a.value}"
    return f"waits for {a.value}"

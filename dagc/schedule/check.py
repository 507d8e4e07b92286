"""What makes a schedule well-formed on its own, as (actor, step, problem) triples.

- every action that moves a value has its channel (the channels section names one for the
  value and the process) of the right transport, and names the channel's ends as peers;
- every channel is written once per execution by its writer and read once by each reader;
  a communicator channel's writer sends once to each reader and each reader receives once;
- between two processes, communicator sends and receives pair up in the same order;
- every issued send or receive (isend/icrecv) is waited on once, after it is issued, and
  every wait names something issued before it (:func:`wait_problems`);
- every collective has one action on each of its participants;
- a process has each value before it uses it (a call's arguments, what it sends);
- every call has its entry in the calls section, with the same method.

``Schedule.problems()`` returns them; ``IR.verify()`` reports them on the marked table
(step -1: the problem has no one place, such as a read that never happens).
"""

from __future__ import annotations

from collections import Counter

from dagc.ir import DRIVER, INPUT, Field, Ref
from dagc.schedule.action import OP_KINDS, RECV_KINDS, Kind

_ISSUES = (Kind.ISEND, Kind.ICRECV)
_WAITS = (Kind.WAIT_RECV, Kind.WAIT_SEND)
_COMM_MOVES = (Kind.CSEND, Kind.ISEND, Kind.CRECV, Kind.ICRECV, Kind.WAIT_RECV, Kind.WAIT_SEND)


def problems(sched) -> list[tuple[str, int, str]]:
    out: list[tuple[str, int, str]] = []
    out += _order_problems(sched)
    out += _channel_problems(sched)
    out += _pairing_problems(sched)
    out += wait_problems(sched)
    out += _collective_problems(sched)
    out += _use_problems(sched)
    return out


def _order_problems(sched) -> list:
    """A column runs top to bottom, so its steps never go down: the table (rows are steps)
    must show the program that runs."""
    out = []
    for p in sched.actors:
        prev = None
        for step, a in sched.of(p):
            if prev is not None and step < prev:
                out.append((p, step, f"'{a}' at step {step} comes after step {prev}"))
            prev = step
    return out


def _channel_problems(sched) -> list:
    out = []
    for p in sched.actors:
        for step, a in sched.of(p):
            if a.kind in OP_KINDS:
                continue
            try:
                c = sched.channel_of(p, a)
            except KeyError:
                out.append((p, step, f"'{a}': no channel carries {a.value} for {p}"))
                continue
            comm = c.transport == "comm"
            if comm != (a.kind in _COMM_MOVES):
                out.append((p, step, f"'{a}' on {c.transport} channel {c.id}"))
            if a.kind in RECV_KINDS:
                if a.peers != (c.writer,):
                    out.append((p, step, f"'{a}': {c.id} is written by {c.writer}"))
            elif a.kind == Kind.SEND and a.peers != c.readers:
                out.append((p, step, f"'{a}': {c.id} is read by {','.join(c.readers)}"))
            elif a.kind != Kind.SEND and (not a.peers or not set(a.peers) <= set(c.readers)):
                out.append((p, step, f"'{a}': {c.id} is read by {','.join(c.readers)}"))
    return out


def _pairing_problems(sched) -> list:
    """Each channel written once and read once per reader; comm sends and receives in the
    same order on both ends (per communicator, sender and receiver)."""
    out = []
    count: Counter[tuple[str, str, str]] = Counter()  # (channel id, role, process) -> times
    first: dict[tuple[str, str, str], tuple[str, int]] = {}  # -> (process, step) of the first
    sent: dict[tuple, list] = {}  # (communicator, writer, reader) -> values, in order
    got: dict[tuple, list] = {}
    for p in sched.actors:
        for step, a in sched.of(p):
            if a.kind in OP_KINDS or a.kind in _WAITS:
                continue
            try:
                c = sched.channel_of(p, a)
            except KeyError:
                continue  # reported by _channel_problems
            if a.kind == Kind.SEND:
                keys = [(c.id, "write", p)]
            elif a.kind == Kind.RECV:
                keys = [(c.id, "read", p)]
            elif a.kind in (Kind.CSEND, Kind.ISEND):
                keys = [(c.id, "send", r) for r in a.peers]
                for r in a.peers:
                    sent.setdefault((c.communicator, p, r), []).append((a.value, step))
            else:
                keys = [(c.id, "recv", p)]
                got.setdefault((c.communicator, c.writer, p), []).append((a.value, step))
            for k in keys:
                count[k] += 1
                first.setdefault(k, (p, step))
    for c in sched.channels:
        if c.transport == "comm":
            want = [
                ((c.id, "send", r), c.writer, f"{c.writer} sends {c.value} to {r}")
                for r in c.readers
            ]
            want += [((c.id, "recv", r), r, f"{r} receives {c.value}") for r in c.readers]
        else:
            want = [((c.id, "write", c.writer), c.writer, f"{c.writer} writes {c.value}")]
            want += [((c.id, "read", r), r, f"{r} reads {c.value}") for r in c.readers]
        for key, proc, what in want:
            if count[key] != 1:
                _, step = first.get(key, (proc, -1))
                out.append(
                    (
                        proc,
                        step,
                        f"{what} through {c.id} {count[key]} times, not once per execution",
                    )
                )
    for key in sorted(set(sent) | set(got)):
        s, g = sent.get(key, []), got.get(key, [])
        if [v for v, _ in s] != [v for v, _ in g]:
            _, w, r = key
            step = next((st for (v, st), (u, _) in zip(g, s) if v != u), g[-1][1] if g else 0)
            out.append(
                (
                    r,
                    step,
                    f"receives {','.join(str(v) for v, _ in g)} from {w}, which "
                    f"sends {','.join(str(v) for v, _ in s)}: not in one order",
                )
            )
    return out


def _handle(a, peer: str) -> tuple:
    send = a.kind in (Kind.ISEND, Kind.WAIT_SEND)
    return ("send" if send else "recv", a.value, peer)


def wait_problems(sched) -> list:
    """Each column waits once on every op it issues, after issuing it."""
    out = []
    for p in sched.actors:
        open_: dict[tuple, tuple] = {}
        for step, a in sched.of(p):
            if a.kind in _ISSUES:
                if len(a.peers) != 1:
                    out.append((p, step, f"names {len(a.peers)} peers, not exactly one"))
                for peer in a.peers:
                    k = _handle(a, peer)
                    if k in open_:
                        out.append((p, step, f"issued twice before a wait ({k[0]} {a.value})"))
                    open_[k] = (step, a)
            elif a.kind in _WAITS:
                if not a.peers:
                    out.append((p, step, "waits on nothing: no peers named"))
                for peer in a.peers:
                    if open_.pop(_handle(a, peer), None) is None:
                        out.append((p, step, f"waits on {a.value} {peer}, never issued before"))
        for step, a in open_.values():
            out.append((p, step, f"never waited on ({a})"))
    return out


def _collective_problems(sched) -> list:
    out = []
    where: dict[str, list] = {}
    for p in sched.actors:
        for step, a in sched.of(p):
            if a.kind == Kind.COLL:
                where.setdefault(a.group, []).append((p, step))
    for group, places in where.items():
        for p, n in Counter(p for p, _ in places).items():
            if n != 1:
                step = next(s for q, s in places if q == p)
                out.append((p, step, f"takes part in collective {group} {n} times"))
    return out


def _use_problems(sched) -> list:
    """Values used before the process has them; calls without a calls entry."""
    out = []
    made: Counter = Counter()
    for p in sched.actors:
        have = {INPUT} if p == DRIVER else set()
        for step, a in sched.of(p):
            if a.kind in OP_KINDS:
                made[a.value] += 1
                try:
                    call = sched.call(a.value)
                except KeyError:
                    out.append((p, step, f"'{a}' has no entry in the calls section"))
                    continue
                if call.method != a.method:
                    out.append((p, step, f"'{a}' calls {a.method}, its calls entry {call.method}"))
                for arg in call.refs():
                    need = INPUT if isinstance(arg, Field) else arg
                    if isinstance(need, Ref) and need not in have:
                        out.append((p, step, f"'{a}' uses {arg} before {p} has it"))
                have.add(a.value)
                if call.num_returns != 1:
                    have.update(Ref(a.value.op, i) for i in range(call.num_returns))
            elif a.kind in (Kind.RECV, Kind.CRECV, Kind.WAIT_RECV):
                have.add(a.value)
            elif a.kind in (Kind.SEND, Kind.CSEND, Kind.ISEND) and a.value not in have:
                out.append((p, step, f"'{a}' sends {a.value} before {p} has it"))
    for value, n in made.items():
        if n != 1:
            out.append((DRIVER, -1, f"{value} is computed {n} times"))
    return out

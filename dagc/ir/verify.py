"""What ``IR.verify()`` checks, as problem strings (and marks on the schedule table).

- graph: acyclic; every node holds its Op, of a known kind, on a known actor; every value
  argument names an op and has its edge; every input field exists; the output names ops;
- channels: ids unique; the writer makes the value (the driver writes the input); readers
  known, sorted, unique, not the writer; transport, slots, buffer and carrier sane; every
  value read on another process than the one that makes it, and every output, has exactly
  one channel from its maker to that reader;
- communicator groups: ids unique, members known and unique; once lower-comm ran, every
  tensor channel names a group holding its writer and readers, and every collective a group
  over exactly its participants;
- schedule (once scheduled): one column per process; each op called once, on its actor,
  with the IR's method, group and arguments; the IR's channels; and the schedule's own
  well-formedness (``Schedule.problems()``: send/receive pairing, waits, uses).

This module reads the IR by attribute and imports only :mod:`dagc.ir.values`.
"""

from __future__ import annotations

from collections import Counter

import networkx as nx

from dagc.ir.values import COLLECTIVE, DRIVER, INPUT, KINDS, Field, Ref, proc_key

TRANSPORTS = ("shm", "tcp", "comm")
CARRIERS = ("shm", "tcp")


def problems(ir) -> tuple[list[str], dict]:
    """(problems, marks): marks map (actor, step) -> note for the schedule table."""
    out = _graph_problems(ir)
    out += _channel_problems(ir)
    out += _group_problems(ir)
    marks: dict = {}
    if ir.schedule is not None:
        out += _schedule_problems(ir, marks)
    return out, marks


def _graph_problems(ir) -> list[str]:
    out = []
    actor_ids = [a.id for a in ir.actors]
    for a, n in Counter(actor_ids).items():
        if n > 1:
            out.append(f"actor id {a} used {n} times")
    if not nx.is_directed_acyclic_graph(ir.graph):
        out.append("graph has a cycle")
    for n, data in ir.graph.nodes(data=True):
        op = data.get("op")
        if getattr(op, "id", None) != n:
            out.append(f"node {n} has no matching Op")
            continue
        if op.kind not in KINDS:
            out.append(f"{n}: unknown kind {op.kind}")
        if op.actor not in actor_ids:
            out.append(f"{n}: unknown actor {op.actor}")
        if (op.kind == COLLECTIVE) != bool(op.group):
            out.append(f"{n}: a {op.kind} with group {op.group!r}")
        for a in op.refs():
            if isinstance(a, Ref) and a.op not in ir.graph:
                out.append(f"{n}: argument {a} names no op")
            elif isinstance(a, Ref) and not ir.graph.has_edge(a.op, n):
                out.append(f"{n}: missing edge {a.op} -> {n}")
            elif isinstance(a, Field) and a.number >= len(ir.inputs.fields):
                out.append(f"{n}: argument {a} names no input field")
    for r in ir.output.refs:
        if isinstance(r, Ref) and r.op not in ir.graph:
            out.append(f"output {r} names no op")
    return out


def _maker(ir, value: Ref):
    """The process that makes ``value``, or None when no op does."""
    if value == INPUT:
        return DRIVER
    if value.op not in ir.graph or "op" not in ir.graph.nodes[value.op]:
        return None
    op = ir.op(value.op)
    if value.index is not None and not 0 <= value.index < op.num_returns:
        return None
    return op.actor


def _channel_problems(ir) -> list[str]:
    out = []
    procs = {DRIVER} | {a.id for a in ir.actors}
    for cid, n in Counter(c.id for c in ir.channels).items():
        if n > 1:
            out.append(f"channel id {cid} used {n} times")
    carried: dict[tuple, list] = {}
    for c in ir.channels:
        where = f"channel {c.id} ({c.value})"
        maker = _maker(ir, c.value)
        if maker is None:
            out.append(f"{where}: no op makes {c.value}")
        elif c.writer != maker:
            out.append(f"{where}: written by {c.writer}, but {maker} makes it")
        if not c.readers or not set(c.readers) <= procs:
            out.append(f"{where}: readers {','.join(c.readers)} are not processes of the DAG")
        if len(set(c.readers)) != len(c.readers) or c.writer in c.readers:
            out.append(f"{where}: readers {','.join(c.readers)} repeat or include the writer")
        if list(c.readers) != sorted(c.readers, key=proc_key):
            out.append(f"{where}: readers {','.join(c.readers)} are not sorted")
        if c.transport not in TRANSPORTS or c.carrier not in CARRIERS:
            out.append(f"{where}: unknown transport {c.transport} / carrier {c.carrier}")
        if c.slots < 1 or c.buffer_size < 1:
            out.append(f"{where}: {c.slots} slots of {c.buffer_size} B")
        if c.transport == "comm" and DRIVER in c.readers:
            out.append(f"{where}: the driver reads a communicator channel")
        if c.transport != "comm" and (c.communicator or c.carrier != "shm"):
            out.append(
                f"{where}: a {c.transport} channel with communicator "
                f"{c.communicator!r}, carrier {c.carrier}"
            )
        for r in c.readers:
            carried.setdefault((c.value, r), []).append(c.id)
    for (value, r), cids in carried.items():
        if len(cids) > 1:
            out.append(f"{value} reaches {r} through {len(cids)} channels ({','.join(cids)})")
    if not ir.channels:
        return out  # the channels pass has not run
    for op in ir.ops():
        for a in op.refs():
            value = INPUT if isinstance(a, Field) else a
            if (
                isinstance(value, Ref)
                and _maker(ir, value) not in (None, op.actor)
                and (value, op.actor) not in carried
            ):
                out.append(
                    f"{op.id} on {op.actor} reads {a}, but no channel carries {value} to {op.actor}"
                )
    for r in ir.output.refs:
        if isinstance(r, Ref) and (r, DRIVER) not in carried:
            out.append(f"output {r}: no channel carries it to the driver")
    return out


def _group_problems(ir) -> list[str]:
    out = []
    actor_ids = {a.id for a in ir.actors}
    groups = {}
    for g in ir.comm_groups:
        if g.id in groups:
            out.append(f"communicator group id {g.id} used twice")
        groups[g.id] = g
        if (
            not g.backend
            or not g.members
            or not set(g.members) <= actor_ids
            or len(set(g.members)) != len(g.members)
        ):
            out.append(f"communicator group {g}: needs a backend and distinct known members")
    lowered = bool(ir.comm_groups) or ir.schedule is not None
    for c in ir.channels:
        if c.transport != "comm" or not (c.communicator or lowered):
            continue
        g = groups.get(c.communicator)
        if g is None:
            out.append(
                f"channel {c.id} ({c.value}): names no communicator group ({c.communicator!r})"
            )
        elif not {c.writer, *c.readers} <= set(g.members):
            out.append(
                f"channel {c.id} ({c.value}): group {g.id} lacks "
                f"{','.join(sorted({c.writer, *c.readers} - set(g.members)))}"
            )
    members: dict[str, list] = {}
    for op in ir.ops():
        if op.kind == COLLECTIVE:
            members.setdefault(op.group, []).append(op.actor)
    named = dict(ir.collectives)
    if len(named) != len(ir.collectives):
        out.append("a collective group is named twice in ir.collectives")
    for gid, kid in named.items():
        g = groups.get(kid)
        if gid not in members:
            out.append(f"collective {gid} (on {kid}) has no ops")
        elif g is None:
            out.append(f"collective {gid}: names no communicator group ({kid!r})")
        elif set(g.members) != set(members[gid]):
            out.append(
                f"collective {gid}: group {kid} is over {','.join(g.members)}, its "
                f"participants are {','.join(members[gid])}"
            )
    if lowered:
        for gid in sorted(set(members) - set(named)):
            out.append(f"collective {gid} has no communicator group")
    return out


def _schedule_problems(ir, marks: dict) -> list[str]:
    sched = ir.schedule
    out = []

    def mark(actor: str, step: int, note: str) -> None:
        if step < 0:  # no one place in the table
            out.append(f"{actor}: {note}")
            return
        out.append(f"{actor} step {step}: {note}")
        marks[(actor, step)] = f"{marks[(actor, step)]}; {note}" if (actor, step) in marks else note

    want = (DRIVER, *(a.id for a in ir.actors))
    if tuple(sched.actors) != want:
        out.append(f"schedule columns {','.join(sched.actors)}, not {','.join(want)}")
    if tuple(sched.channels) != tuple(ir.channels):
        out.append("the schedule's channels are not the IR's")
    called: Counter = Counter()
    for p in sched.actors:
        for step, a in sched.of(p):
            if a.kind not in ("call", "coll"):
                continue
            op = ir.graph.nodes[a.value.op].get("op") if a.value.op in ir.graph else None
            if op is None or a.value.index is not None:
                mark(p, step, f"'{a}': no op {a.value} in the IR")
                continue
            called[op.id] += 1
            coll = op.kind == COLLECTIVE
            if (
                op.actor != p
                or (a.kind == "coll") != coll
                or a.method != op.method
                or a.group != (op.group or "")
            ):
                mark(p, step, f"'{a}' is not the IR's {op}")
            try:
                call = sched.call(a.value)
            except KeyError:
                continue  # reported by Schedule.problems()
            if (call.args, call.kwargs, call.num_returns) != (op.args, op.kwargs, op.num_returns):
                mark(p, step, f"calls '{call}', the IR says {op}")
    for op in ir.ops():
        if called[op.id] != 1:
            out.append(
                f"{op.id} ({op.actor}.{op.method}) is called {called[op.id]} times "
                f"in the schedule, not once"
            )
    for actor, step, note in sched.problems():
        mark(actor, step, note)
    return out

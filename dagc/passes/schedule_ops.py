"""schedule: IR -> IR with a Schedule (per-actor ordered actions), proven deadlock-free.

Rule: every process executes the restriction of ONE global order (a topological order of
the ops in which each collective is a single node, and which keeps every actor's methods
in the order they were bound), and each communicator exchange sits in that order right
after the op that produced it, so all blocking communicator ops pair up in the same
relative order on every participant. Shared-memory reads go just before first
use (they are buffered, so they cannot close a cycle). Steps are assigned as soon as
possible, so the Step x Actor table shows what may run at once. The simulator
(``dagc.passes.simulate``) then runs the schedule with blocking rendezvous semantics and
raises DeadlockError if it can get stuck.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import networkx as nx

from dagc.errors import CompileError, DeadlockError
from dagc.ir import COLLECTIVE, DRIVER, INPUT, IR, Field, Ref, bind_reordered, op_sort_key
from dagc.passes.base import Pass, PassContext
from dagc.passes.simulate import simulate
from dagc.schedule import Action, Call, Entry, Kind, Schedule


def global_order(ir: IR) -> list[list[str]]:
    """A deterministic topological order; each entry is one op, or all ops of a collective.

    Constraints: data dependencies, and each actor's bind order (an edge from every op of
    bind position k to every op of the actor's next position). A cycle through a bind-order
    edge is the user's binds contradicting their data: CompileError naming both ops.
    """
    g = ir.graph
    group_of = {n: ir.op(n).group for n in g.nodes if ir.op(n).kind == COLLECTIVE}
    rep = {n: (f"~{group_of[n]}" if n in group_of else n) for n in g.nodes}
    cg = nx.DiGraph()
    for n in g.nodes:
        cg.add_node(rep[n])
    for u, v in g.edges:
        if rep[u] != rep[v]:
            cg.add_edge(rep[u], rep[v])
    for u, v in bind_edges(ir):
        if rep[u] != rep[v] and not cg.has_edge(rep[u], rep[v]):
            cg.add_edge(rep[u], rep[v], bind=(u, v))
    if not nx.is_directed_acyclic_graph(cg):
        cycle = nx.find_cycle(cg)
        bound = [cg.edges[e]["bind"] for e in cycle if "bind" in cg.edges[e]]
        if bound:
            raise CompileError(_bind_order_message(ir, cg, *bound[0]))
        cyc = " -> ".join(u for u, _ in cycle)
        raise DeadlockError(f"collectives depend on each other's results in a cycle ({cyc}); "
                            f"no order of communicator ops can complete. Split the collective "
                            f"or reorder the binds.")
    members: dict[str, list[str]] = {}
    for n in g.nodes:
        members.setdefault(rep[n], []).append(n)

    def key(r: str) -> str:
        return min(op_sort_key(n) for n in members[r])

    return [sorted(members[r], key=op_sort_key)
            for r in nx.lexicographical_topological_sort(cg, key=key)]


def bind_edges(ir: IR) -> list[tuple[str, str]]:
    """(earlier, later) op pairs: consecutive bind positions of one actor, ties unordered."""
    by_actor: dict[str, dict[int, list[str]]] = {}
    for op in ir.ops():
        if op.bind_index is not None:
            by_actor.setdefault(op.actor, {}).setdefault(op.bind_index, []).append(op.id)
    edges = []
    for actor in sorted(by_actor):
        positions = sorted(by_actor[actor].items())
        for (_, before), (_, after) in zip(positions, positions[1:]):
            edges += [(u, v) for u in sorted(before, key=op_sort_key)
                      for v in sorted(after, key=op_sort_key)]
    return edges


def _bind_order_message(ir: IR, cg: nx.DiGraph, first: str, second: str) -> str:
    """``first`` is bound before ``second`` on one actor, yet needs what ``second`` makes."""
    a, b = ir.op(first), ir.op(second)
    rep = lambda n: f"~{ir.op(n).group}" if ir.op(n).kind == COLLECTIVE else n
    path = nx.shortest_path(cg, rep(second), rep(first))
    via = " -> ".join(p.lstrip("~") for p in path)
    if any("bind" in cg.edges[e] for e in zip(path, path[1:])):
        via += ", counting other actors' bind order"
    label = ir.actor(a.actor).label

    def name(op) -> str:
        where = f" at {op.where}" if op.where else ""
        return (f"{label}.{op.method} ({op.id}, bound {_ordinal(op.bind_index)} on "
                f"{op.actor}{where})")

    return (f"{name(a)} is bound before {name(b)} but needs its result ({via}); an actor "
            f"runs its methods in the order they were bound. Fix: bind {label}.{b.method} "
            f"before {label}.{a.method}, all through one handle of the actor (each copy of "
            f"a handle counts its binds separately), or move one of them to another actor.")


def _ordinal(k: int) -> str:
    n = k + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def build_schedule(ir: IR) -> Schedule:
    procs = [DRIVER] + [a.id for a in ir.actors]
    acts: dict[str, list[Entry]] = {p: [] for p in procs}
    ready = {p: 0 for p in procs}                 # next free step per process
    avail: dict[tuple[str, str], int] = {}        # (channel id) -> first step a reader may read
    have: dict[str, set] = {p: set() for p in procs}
    by_value: dict[tuple[str, str], object] = {}  # (value, reader) -> ChannelSpec
    written_by: dict[str, list] = {}              # value -> channels written after it exists
    for c in ir.channels:
        for r in c.readers:
            by_value[(c.value, r)] = c
        written_by.setdefault(c.value, []).append(c)

    def emit(p: str, step: int, kind: Kind, value: Ref, **kw) -> int:
        acts[p].append(Entry(step, Action(kind, value, **kw)))
        ready[p] = step + 1
        return step

    def fetch(p: str, value: Ref) -> None:
        """Make ``value`` (a value ref or INPUT) present on process p."""
        if value in have[p]:
            return
        c = by_value.get((value, p))
        if c is None:  # produced on p itself
            have[p].add(value)
            return
        if c.transport == "comm":
            raise AssertionError(f"{value} on {p}: comm values arrive when produced")
        emit(p, max(ready[p], avail[c.id]), Kind.READ, value, peers=(c.writer,))
        have[p].add(value)

    def produced(p: str, op_id: str, num_returns: int) -> None:
        values = [Ref(op_id)] if num_returns == 1 else [Ref(op_id, i) for i in range(num_returns)]
        for v in values:
            have[p].add(v)
            for c in written_by.get(v, []):
                if c.transport == "comm":
                    for r in c.readers:
                        s = max(ready[p], ready[r])
                        emit(p, s, Kind.CSEND, v, peers=(r,))
                        emit(r, s, Kind.CRECV, v, peers=(p,))
                        have[r].add(v)
                else:
                    avail[c.id] = emit(p, ready[p], Kind.WRITE, v, peers=c.readers) + 1
        if num_returns != 1:
            have[p].add(Ref(op_id))

    for c in ir.channels:
        if c.value == INPUT:
            avail[c.id] = emit(DRIVER, 0, Kind.WRITE, INPUT, peers=c.readers) + 1
            have[DRIVER].add(INPUT)

    shown = bind_reordered((o.actor, o.id, o.bind_index) for o in ir.ops())
    input_readers = set()
    for c in ir.channels:
        if c.value == INPUT:
            input_readers.update(c.readers)
    for entry in global_order(ir):
        ops = [ir.op(n) for n in entry]
        for op in ops:
            if op.actor in input_readers:
                fetch(op.actor, INPUT)
            for a in op.refs():
                if isinstance(a, Ref):
                    fetch(op.actor, a)
                elif isinstance(a, Field):
                    fetch(op.actor, INPUT)
        step = max(ready[op.actor] for op in ops)
        for op in ops:
            coll = op.kind == COLLECTIVE
            emit(op.actor, step if coll else ready[op.actor], Kind.COLL if coll else Kind.CALL,
                 Ref(op.id), method=op.method, group=op.group or "",
                 bind=op.bind_index if op.actor in shown and op.bind_index is not None else -1)
        for op in ops:
            produced(op.actor, op.id, op.num_returns)

    for r in dict.fromkeys(ir.output.refs):
        fetch(DRIVER, r)

    labels = {DRIVER: DRIVER}
    labels.update({a.id: a.label for a in ir.actors})
    calls = tuple(Call(Ref(op.id), op.method, op.args, op.kwargs, op.num_returns)
                  for op in sorted(ir.ops(), key=lambda o: op_sort_key(o.id)))
    return Schedule(actors=tuple(procs), actions=acts, calls=calls, channels=ir.channels,
                    labels=labels)


@dataclass(frozen=True)
class ScheduleOps(Pass):
    name: ClassVar[str] = "schedule"

    def run(self, ir: IR, ctx: PassContext) -> IR:
        sched = build_schedule(ir)
        steps = simulate(sched)
        return ir.replace(schedule=replace(sched, simulated_steps=steps))

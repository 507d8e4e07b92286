"""schedule-ops: IR -> IR with a Schedule (per-actor ordered actions), proven deadlock-free.

Rule: every process executes the restriction of ONE global order (a topological order of
the ops in which each collective is a single node, and which keeps every actor's methods
in the order they were bound), and each communicator exchange sits in that order right
after the op that produced it, so all blocking communicator ops pair up in the same
relative order on every participant. Shared-memory reads go just before first
use (they are buffered, so they cannot close a cycle). Steps are assigned as soon as
possible, so the Step x Actor table shows what may run at once. The simulator
(``dagc.schedule.simulate``) then runs the schedule with blocking rendezvous semantics and
raises DeadlockError if it can get stuck.

Within that rule the pass still chooses, from the costs (``costs=``: uniform unless given;
see :mod:`dagc.schedule.costs`):

- where a blocking receive (``crecv``) sits on its reader: right after the value is made
  (the sender's send returns soonest), or as late as the reader's column allows - before
  the first use of the value or the reader's next communicator op, whichever comes first
  (so each process's order of communicator ops is the same either way) - so the reader
  computes, and reads its shared-memory inputs, while the sender produces (the last stage
  of a pipeline runs microbatch m's forward before it blocks for m+1's activation). The
  pass keeps whichever the simulator predicts to finish first (the early one on a tie); a
  candidate the simulator finds can deadlock is dropped (the early one never is: its
  DeadlockError is the compile's).
- with ``reorder="critical-path"``: the global order is a list schedule that runs first,
  of the ops ready, the one with the longest remaining path to the output (its cost plus
  its consumers', HEFT's upward rank), and an actor's calls of methods marked
  ``@dagc.reorderable`` are free of bind order among themselves (a call of an unmarked
  method stays where it was bound, with respect to every other call of the actor). Without
  it the order is bind order, ties broken by op id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import networkx as nx

from dagc.errors import CompileError, DeadlockError
from dagc.ir import (
    COLLECTIVE,
    DRIVER,
    INPUT,
    IR,
    ChannelSpec,
    Field,
    Ref,
    bind_reordered,
    op_sort_key,
)
from dagc.passes.base import Pass, PassContext
from dagc.passes.bind_order import bind_edges, bind_order_message
from dagc.schedule import Action, Call, Entry, Kind, Schedule
from dagc.schedule.costs import Costs, Timing, makespan
from dagc.schedule.simulate import Run, comm_order, run, timing_of

REORDERS = ("bind", "critical-path")
COMM_ORDERED = (Kind.CSEND, Kind.CRECV, Kind.COLL)  # one order per process: kept


def global_order(
    ir: IR, reorder: str = "bind", costs: Costs | None = None, strategy: str = ""
) -> list[list[str]]:
    """A deterministic topological order; each entry is one op, or all ops of a collective.

    Constraints: data dependencies, and each actor's bind order (an edge from every op of
    bind position k to every op of the actor's next position; with ``reorder=
    "critical-path"``, none between two calls of reorderable methods). A cycle through a
    bind-order edge is the user's binds contradicting their data: CompileError naming both
    ops. Of the ops ready, the first by op id goes first; with ``"critical-path"``, the one
    with the longest remaining path (:func:`upward_ranks` from ``costs``). ``strategy=
    "etf"``: the one that can start earliest by the costs (list scheduling, earliest time
    first), ties broken as above.
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
    for u, v in bind_edges(ir, relaxed=reorder == "critical-path"):
        if rep[u] != rep[v] and not cg.has_edge(rep[u], rep[v]):
            cg.add_edge(rep[u], rep[v], bind=(u, v))
    if not nx.is_directed_acyclic_graph(cg):
        cycle = nx.find_cycle(cg)
        bound = [cg.edges[e]["bind"] for e in cycle if "bind" in cg.edges[e]]
        if bound:
            raise CompileError(bind_order_message(ir, cg, *bound[0]))
        cyc = " -> ".join(u for u, _ in cycle)
        raise DeadlockError(
            f"collectives depend on each other's results in a cycle ({cyc}); "
            f"no order of communicator ops can complete. Split the collective "
            f"or reorder the binds."
        )
    members: dict[str, list[str]] = {}
    for n in g.nodes:
        members.setdefault(rep[n], []).append(n)

    first = {r: min(op_sort_key(n) for n in members[r]) for r in members}
    costs = costs or Costs.uniform()
    key: Callable[[str], Any]  # an entry's representative -> its sort key
    if reorder == "critical-path":
        rank = upward_ranks(ir, costs)
        prio = {r: max(rank[n] for n in members[r]) for r in members}
        key = lambda r: (-prio[r], first[r])  # longest path first
    else:
        key = first.__getitem__
    if strategy == "etf":
        reps = _earliest_first(ir, cg, members, rep, costs, key)
    else:
        reps = nx.lexicographical_topological_sort(cg, key=key)
    return [sorted(members[r], key=op_sort_key) for r in reps]


def _earliest_first(
    ir: IR, cg: nx.DiGraph, members: dict, rep: dict, costs: Costs, key
) -> list[str]:
    """A topological order of ``cg`` by list scheduling: of the entries whose predecessors
    are placed, the one that can start earliest (its actors free, its inputs there, by the
    costs) goes next; ties by ``key``. Sends are taken not to block (a heuristic: the
    simulator judges the result)."""
    import heapq

    moves = _move_costs(ir, costs)
    actors = {r: sorted({ir.op(n).actor for n in ns}) for r, ns in members.items()}
    own = {
        r: max(costs.of_action(ir.op(n).actor, _op_action(ir, n)) for n in ns)
        for r, ns in members.items()
    }
    lat: dict[tuple, float] = {}
    for u, v in ir.graph.edges:
        a, b = ir.op(u).actor, ir.op(v).actor
        if rep[u] != rep[v]:
            e = (rep[u], rep[v])
            lat[e] = max(lat.get(e, 0.0), 0.0 if a == b else moves.get((u, b), 0.0))
    free: dict[str, float] = {}
    finish: dict[str, float] = {}
    indeg = {r: cg.in_degree(r) for r in cg.nodes}

    def est(r: str) -> float:
        t = max((free.get(a, 0.0) for a in actors[r]), default=0.0)
        for p in cg.predecessors(r):
            t = max(t, finish[p] + lat.get((p, r), 0.0))
        return t

    heap = [(0.0, key(r), r) for r, d in indeg.items() if d == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        t, k, r = heapq.heappop(heap)
        now = est(r)
        if now > t:  # an actor got busy meanwhile: look again later
            heapq.heappush(heap, (now, k, r))
            continue
        out.append(r)
        finish[r] = now + own[r]
        for a in actors[r]:
            free[a] = finish[r]
        for s in cg.successors(r):
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (est(s), key(s), s))
    return out


def _op_action(ir: IR, n: str) -> Action:
    op = ir.op(n)
    return Action(Kind.COLL if op.kind == COLLECTIVE else Kind.CALL, Ref(n), method=op.method)


def _move_costs(ir: IR, costs: Costs) -> dict:
    """(op id, reader) -> the cost of moving the op's value to that reader."""
    moves = {}
    for c in ir.channels:
        for r in c.readers:
            if c.transport == "comm":
                moves[(c.value.op, r)] = costs.of_transfer(r, c.value, c.writer)
            else:
                moves[(c.value.op, r)] = costs.actions.get(
                    f"{r} recv {c.value}<{c.writer}", costs.move
                ) + costs.actions.get(
                    f"{c.writer} send {c.value}>{','.join(c.readers)}", costs.move
                )
    return moves


def upward_ranks(ir: IR, costs: Costs) -> dict[str, float]:
    """Per op: its cost plus the longest path of costs from it to the end of the graph
    (HEFT's upward rank): a call's cost, and a move's where the edge crosses processes."""
    g = ir.graph
    moves = _move_costs(ir, costs)
    rank: dict[str, float] = {}
    for n in reversed(list(nx.lexicographical_topological_sort(g, key=op_sort_key))):
        op = ir.op(n)
        own = costs.of_action(op.actor, _op_action(ir, n))
        after = 0.0
        for v in g.successors(n):
            w = ir.op(v).actor
            after = max(after, rank[v] + (0.0 if w == op.actor else moves.get((n, w), 0.0)))
        rank[n] = own + after
    return rank


def build_schedule(
    ir: IR,
    reorder: str = "bind",
    costs: Costs | None = None,
    late: bool = False,
    strategy: str = "",
) -> Schedule:
    """The schedule of ``global_order(ir, reorder, costs, strategy)``; ``late``: each
    blocking receive as late as its reader's column allows (see the module doc)."""
    procs = [DRIVER] + [a.id for a in ir.actors]
    acts: dict[str, list[Entry]] = {p: [] for p in procs}
    ready = {p: 0 for p in procs}  # next free step per process
    avail: dict[str, int] = {}  # channel id -> first step a reader may read
    have: dict[str, set[Ref]] = {p: set() for p in procs}
    by_value: dict[tuple[Ref, str], ChannelSpec] = {}  # (value, reader) -> its channel
    written_by: dict[Ref, list[ChannelSpec]] = {}  # value -> channels written after it exists
    # late: (value, writer, send step)
    deferred: dict[str, list[tuple[Ref, str, int]]] = {p: [] for p in procs}
    for c in ir.channels:
        for r in c.readers:
            by_value[(c.value, r)] = c
        written_by.setdefault(c.value, []).append(c)

    def emit(p: str, step: int, kind: Kind, value: Ref, **kw) -> int:
        if kind in COMM_ORDERED and deferred[p]:
            settle(p)  # before its next communicator op
            step = max(step, ready[p])
        acts[p].append(Entry(step, Action(kind, value, **kw)))
        ready[p] = step + 1
        return step

    def settle(p: str, upto: Ref | None = None) -> None:
        """Emit ``p``'s deferred receives, in order: all, or through ``upto``."""
        while deferred[p]:
            v, w, s = deferred[p].pop(0)
            acts[p].append(Entry(max(ready[p], s), Action(Kind.CRECV, v, peers=(w,))))
            ready[p] = max(ready[p], s) + 1
            have[p].add(v)
            if v == upto:
                return

    def fetch(p: str, value: Ref) -> None:
        """Make ``value`` (a value ref or INPUT) present on process p."""
        if value in have[p]:
            return
        c = by_value.get((value, p))
        if c is None:  # produced on p itself
            have[p].add(value)
            return
        if c.transport == "comm":
            if not any(v == value for v, _, _ in deferred[p]):
                raise AssertionError(f"{value} on {p}: comm values arrive when produced")
            settle(p, value)
            return
        emit(p, max(ready[p], avail[c.id]), Kind.RECV, value, peers=(c.writer,))
        have[p].add(value)

    def produced(p: str, op_id: str, num_returns: int) -> None:
        values = [Ref(op_id)] if num_returns == 1 else [Ref(op_id, i) for i in range(num_returns)]
        for v in values:
            have[p].add(v)
            for c in written_by.get(v, []):
                if c.transport == "comm":
                    for r in c.readers:
                        if late:
                            s = emit(p, ready[p], Kind.CSEND, v, peers=(r,))
                            deferred[r].append((v, p, s))
                            continue
                        s = max(ready[p], ready[r])
                        emit(p, s, Kind.CSEND, v, peers=(r,))
                        emit(r, s, Kind.CRECV, v, peers=(p,))
                        have[r].add(v)
                else:
                    avail[c.id] = emit(p, ready[p], Kind.SEND, v, peers=c.readers) + 1
        if num_returns != 1:
            have[p].add(Ref(op_id))

    for c in ir.channels:
        if c.value == INPUT:
            avail[c.id] = emit(DRIVER, 0, Kind.SEND, INPUT, peers=c.readers) + 1
            have[DRIVER].add(INPUT)

    order = global_order(ir, reorder, costs, strategy)
    shown = bind_reordered((o.actor, o.id, o.bind_index) for o in ir.ops())
    shown |= _run_out_of_bind_order(ir, order)
    input_readers: set[str] = set()
    for c in ir.channels:
        if c.value == INPUT:
            input_readers.update(c.readers)
    for entry in order:
        ops = [ir.op(n) for n in entry]
        for op in ops:
            if op.actor in input_readers:
                fetch(op.actor, INPUT)
            for a in op.refs():
                if isinstance(a, Ref):
                    fetch(op.actor, a)
                elif isinstance(a, Field):
                    fetch(op.actor, INPUT)
        for op in ops:
            if op.kind == COLLECTIVE and deferred[op.actor]:
                settle(op.actor)
        step = max(ready[op.actor] for op in ops)
        for op in ops:
            coll = op.kind == COLLECTIVE
            emit(
                op.actor,
                step if coll else ready[op.actor],
                Kind.COLL if coll else Kind.CALL,
                Ref(op.id),
                method=op.method,
                group=op.group or "",
                bind=op.bind_index if op.actor in shown and op.bind_index is not None else -1,
            )
        for op in ops:
            produced(op.actor, op.id, op.num_returns)

    for out in dict.fromkeys(ir.output.refs):
        if isinstance(out, Ref):  # each of them: validate-graph refused any other
            fetch(DRIVER, out)
    for p in procs:
        settle(p)

    labels = {DRIVER: DRIVER}
    labels.update({a.id: a.label for a in ir.actors})
    calls = tuple(
        Call(Ref(op.id), op.method, op.args, op.kwargs, op.num_returns)
        for op in sorted(ir.ops(), key=lambda o: op_sort_key(o.id))
    )
    columns = {p: tuple(col) for p, col in acts.items()}
    return Schedule(
        actors=tuple(procs), actions=columns, calls=calls, channels=ir.channels, labels=labels
    )


def _run_out_of_bind_order(ir: IR, order: list[list[str]]) -> set[str]:
    """Actors whose calls ``order`` runs out of bind order (reordered): the table shows
    their bind positions, so a reordering is never silent."""
    last: dict[str, int] = {}
    out = set()
    for entry in order:
        for n in entry:
            op = ir.op(n)
            if op.bind_index is None:
                continue
            if op.bind_index < last.get(op.actor, -1):
                out.add(op.actor)
            last[op.actor] = max(last.get(op.actor, -1), op.bind_index)
    return out


@dataclass(frozen=True)
class ScheduleOps(Pass):
    """``reorder``: "bind" (each actor's calls in bind order) or "critical-path" (the
    compile option ``reorder``; None there is "bind")."""

    name: ClassVar[str] = "schedule-ops"
    requires: ClassVar[frozenset[str]] = frozenset({"validated", "channels", "comm-groups"})
    ensures: ClassVar[frozenset[str]] = frozenset({"schedule"})
    reorder: str

    def run(self, ir: IR, ctx: PassContext) -> IR:
        if self.reorder not in REORDERS:
            raise CompileError(
                f"reorder must be one of {', '.join(map(repr, REORDERS))}, got {self.reorder!r}"
            )
        costs = ctx.costs
        order = comm_order(ir)
        # where the global order and the receives' places are a choice (communicator ops
        # are placed by them), the candidate the simulator predicts to finish first
        candidates = [("", False, costs)]
        if any(c.transport == "comm" for c in ir.channels):
            candidates += [("", True, costs), ("etf", False, costs), ("etf", True, costs)]
            if not costs.is_uniform:  # list scheduling is greedy: the order it finds with
                uniform = Costs.uniform()  # uniform costs may be the better one
                candidates += [("etf", False, uniform), ("etf", True, uniform)]
        best: tuple[Schedule, Run, Timing, float] | None = None
        for strategy, late, order_costs in candidates:
            sched = build_schedule(ir, self.reorder, order_costs, late, strategy)
            if best is not None and sched == best[0]:
                continue
            try:
                result = run(sched, 2, order, costs)
            except DeadlockError:
                if best is None:  # the plain schedule: the user's to fix
                    raise
                continue
            timing = timing_of(sched, result, costs)
            span = (makespan(sched, timing.predicted) or 0.0) if len(candidates) > 1 else 0.0
            if best is None or span < best[3]:
                best = (sched, result, timing, span)
        if best is None:  # the first candidate either deadlocks (raised) or is kept
            raise AssertionError("schedule-ops kept no candidate")
        sched, result, timing, _ = best
        sched = replace(sched, simulated_steps=result.rounds, timing=timing)
        extra = []
        if self.reorder != "bind":
            extra.append(("reorder", self.reorder))
        if not costs.is_uniform:
            extra.append(("costs", costs.digest()))
        return ir.replace(schedule=sched, options=tuple(sorted((*ir.options, *extra))))

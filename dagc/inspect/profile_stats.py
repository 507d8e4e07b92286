"""What a profile says, from its spans (:mod:`dagc.inspect.timeline`): per-op statistics,
the critical path of a representative execution (:func:`summary_dict`, :func:`summary`),
and the measured timing and costs the scheduler predicts with (:func:`measured_timing`,
:func:`measured_costs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dagc.inspect.timeline import Span, actor_order, group_executions, match_spans, us
from dagc.ir import DRIVER
from dagc.schedule import Action, Kind, Schedule
from dagc.schedule.costs import Costs


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (p in 0..100)."""
    if not sorted_values:
        return 0.0
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


def _op_stats(schedule: Schedule, spans: list[Span]) -> list[dict]:
    groups: dict[tuple[str, int, int], list[Span]] = {}
    for s in spans:
        groups.setdefault((s.actor, s.index, s.step), []).append(s)
    order = {a: i for i, a in enumerate(actor_order(schedule, {s.actor: () for s in spans}))}
    rows = []
    for (actor, index, step), ss in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], kv[0][1])
    ):
        durs = sorted(s.dur_ns for s in ss)
        a = ss[0].action
        rows.append(
            {
                "actor": actor,
                "label": schedule.label(actor),
                "step": step,
                "index": index,
                "action": str(a) if a else ss[0].name,
                "kind": a.kind.value if a else "unknown",
                "value": str(a.value) if a else "",
                "count": len(durs),
                "mean_us": us(sum(durs) / len(durs)),
                "p50_us": us(_percentile(durs, 50)),
                "p99_us": us(_percentile(durs, 99)),
            }
        )
    return rows


def _span_ns(ss: list[Span]) -> int:
    return max(s.end_ns for s in ss) - min(s.start_ns for s in ss)


def _representative(by_exec: dict, complete: list[int]) -> tuple[int, str]:
    pool = complete or sorted(by_exec)
    ranked = sorted(pool, key=lambda n: (_span_ns(by_exec[n]), n))
    n = ranked[(len(ranked) - 1) // 2]
    what = "complete" if complete else "recorded (none complete)"
    return n, f"median end-to-end span of {len(pool)} {what} executions"


# -- critical path ------------------------------------------------------------------------


def _senders(a: Action) -> list[tuple[str, str]]:
    """(peer actor, kinds) whose matching action released receive-like action ``a``."""
    if a.kind == Kind.RECV:
        return [(a.peers[0], Kind.SEND)] if a.peers else []
    if a.kind in (Kind.CRECV, Kind.ICRECV, Kind.WAIT_RECV):
        return [(a.peers[0], "comm-send")] if a.peers else []
    return []


def _predecessors(x: Span, spans: dict, schedule: Schedule) -> list[tuple[Span, str]]:
    """Spans of the same execution that could have released ``x``, with how they link."""
    out = []
    prev = spans.get((x.actor, x.index - 1))
    if prev is not None:
        out.append((prev, "same actor"))
    a = x.action
    if a is None:
        return out
    for peer, kind in _senders(a):
        for i, (_, y) in enumerate(schedule.of(peer)):
            s = spans.get((peer, i))
            if s is None or y.value != a.value:
                continue
            if kind == Kind.SEND and y.kind == Kind.SEND and x.actor in y.peers:
                cid = schedule.channel_of(x.actor, a).id
                out.append((s, f"{a.value} via {cid} from {peer}"))
            elif kind == "comm-send" and y.kind in (Kind.CSEND, Kind.ISEND) and x.actor in y.peers:
                out.append((s, f"{a.value} via communicator from {peer}"))
    if a.kind == Kind.COLL:
        for p in schedule.actors:
            if p == x.actor:
                continue
            for i, (_, y) in enumerate(schedule.of(p)):
                if y.kind == Kind.COLL and y.group == a.group and (p, i - 1) in spans:
                    out.append((spans[(p, i - 1)], f"collective {a.group} waits for {p}"))
    return out


def critical_path(schedule: Schedule, spans: list[Span]) -> list[tuple[Span, str]]:
    """Walk back from the last-finishing span through whatever released each one.

    Of a span's predecessors (the previous op of the same actor; the writer of the value
    it received; the other participants of its collective) the one that finished last is
    on the path. Returns (span, link) pairs in time order; link says how the span follows
    the one before it ("same actor", "t2 via c1 from a0", ...; "" for the first).
    """
    by_key = {(s.actor, s.index): s for s in spans if s.index >= 0}
    if not by_key:
        return []
    cur: Span | None = max(by_key.values(), key=lambda s: (s.end_ns, s.start_ns, s.actor, s.index))
    path: list[tuple[Span, str]] = []
    seen = set()
    while cur is not None and (cur.actor, cur.index) not in seen:
        seen.add((cur.actor, cur.index))
        preds = _predecessors(cur, by_key, schedule)
        best = max(preds, key=lambda p: (p[0].end_ns, p[1] == "same actor"), default=None)
        path.append((cur, best[1] if best else ""))
        cur = best[0] if best else None
    path.reverse()
    return [(s, link if i > 0 else "") for i, (s, link) in enumerate(path)]


# -- summary ------------------------------------------------------------------------------


def summary_dict(schedule: Schedule, records: dict) -> dict:
    """Per-op statistics and one critical path, as JSON-able data::

        {"executions": 100, "complete_executions": 100,
         "ops": [{"actor": "a0", "label": "a0:Stage", "step": 2, "index": 1,
                  "action": "fwd t0", "kind": "call", "value": "t0", "count": 100,
                  "mean_us": 3.1, "p50_us": 2.9, "p99_us": 7.4}, ...],
         "critical_path": {"execution": 57, "chosen": "median end-to-end span of ...",
                           "span_us": 41.0, "path_us": 40.2, "busy_us": 35.5,
                           "gaps_us": 4.7,
                           "ops": [{"actor": "a0", "label": "a0:Stage", "step": 1,
                                    "action": "recv in<driver", "start_us": 0.0,
                                    "dur_us": 1.2, "adds_us": 1.2, "via": ""}, ...]}}

    ``start_us`` counts from the start of the chosen execution. An op's ``dur_us`` is its
    whole span (a receive's includes its wait); ``adds_us`` is the part after its
    predecessor on the path ended, i.e. what it adds to the path. ``path_us`` (first start
    to last end along the path) = ``busy_us`` (sum of adds) + ``gaps_us`` (hand-off time
    between one op's end and the next one's start).
    """
    spans = match_spans(schedule, records)
    by_exec, complete = group_executions(schedule, spans)
    out = {
        "executions": len(by_exec),
        "complete_executions": len(complete),
        "ops": _op_stats(schedule, spans),
        "critical_path": None,
    }
    if not by_exec:
        return out
    n, chosen = _representative(by_exec, complete)
    ss = by_exec[n]
    t0 = min(s.start_ns for s in ss)
    path = critical_path(schedule, ss)
    ops, busy, gaps, prev_end = [], 0, 0, None
    for s, link in path:
        begin = s.start_ns if prev_end is None else max(s.start_ns, prev_end)
        adds = max(0, s.end_ns - begin)
        gaps += 0 if prev_end is None else max(0, s.start_ns - prev_end)
        busy += adds
        prev_end = s.end_ns if prev_end is None else max(prev_end, s.end_ns)
        ops.append(
            {
                "actor": s.actor,
                "label": schedule.label(s.actor),
                "step": s.step,
                "action": str(s.action) if s.action else s.name,
                "start_us": us(s.start_ns - t0),
                "dur_us": us(s.dur_ns),
                "adds_us": us(adds),
                "via": link,
            }
        )
    out["critical_path"] = {
        "execution": n,
        "chosen": chosen,
        "span_us": us(_span_ns(ss)),
        "path_us": us(path[-1][0].end_ns - path[0][0].start_ns) if path else 0.0,
        "busy_us": us(busy),
        "gaps_us": us(gaps),
        "ops": ops,
    }
    return out


def _table(heads: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]

    def fmt(r):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    return [fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def format_summary(d: dict) -> str:
    """Text form of :func:`summary_dict`'s result (see :func:`summary`)."""
    lines = [f"per-op time over {d['executions']} executions (µs)"]
    rows = [
        [
            o["label"],
            str(o["step"]),
            o["action"],
            str(o["count"]),
            f"{o['mean_us']:.2f}",
            f"{o['p50_us']:.2f}",
            f"{o['p99_us']:.2f}",
        ]
        for o in d["ops"]
    ]
    lines += _table(
        ["actor", "step", "action", "count", "mean", "p50", "p99"], rows, right={1, 3, 4, 5, 6}
    )
    cp = d["critical_path"]
    if cp is None:
        lines.append("")
        lines.append("critical path: no records")
        return "\n".join(lines) + "\n"
    lines += ["", f"critical path of execution {cp['execution']} ({cp['chosen']})"]
    rows = [
        [
            f"{o['start_us']:.2f}",
            f"{o['dur_us']:.2f}",
            f"{o['adds_us']:.2f}",
            o["label"],
            str(o["step"]),
            o["action"],
            o["via"],
        ]
        for o in cp["ops"]
    ]
    lines += _table(
        ["start", "dur", "adds", "actor", "step", "action", "link"], rows, right={0, 1, 2, 4}
    )
    lines.append(
        f"total: {cp['path_us']:.2f} µs along {len(cp['ops'])} ops = "
        f"{cp['busy_us']:.2f} µs in ops + {cp['gaps_us']:.2f} µs between them; "
        f"execution span {cp['span_us']:.2f} µs"
    )
    return "\n".join(lines) + "\n"


def summary(schedule: Schedule, records: dict) -> str:
    """Per-op timing table, then the critical path of one execution, as text::

        per-op time over 100 executions (µs)
        actor     step  action          count  mean   p50   p99
        --------  ----  --------------  -----  ----  ----  ----
        a0:Stage     1  recv in<driver    100  1.20  1.10  3.40
        ...

        critical path of execution 57 (median end-to-end span of 100 complete executions)
        start   dur  adds  actor     step  action          link
        -----  ----  ----  --------  ----  --------------  ----------
         0.00  1.20  1.20  a0:Stage     1  recv in<driver
         1.30  3.10  3.10  a0:Stage     2  fwd t0          same actor
         ...
        total: 24.00 µs along 7 ops = 23.50 µs in ops + 0.50 µs between them; ...

    ``dur`` is an op's whole span (a receive's includes waiting for the sender); ``adds``
    what it adds to the path after its predecessor on the path ended.
    """
    return format_summary(summary_dict(schedule, records))


# -- measured timing and costs (what the scheduler predicts with) ----------------------------


def _origins(spans: list[Span]) -> dict[int, int]:
    """Per execution, its start: the driver's write of the input (else its first record)."""
    out: dict[int, int] = {}
    for s in spans:
        if s.actor == DRIVER and s.action is not None and s.action.kind == Kind.SEND:
            out[s.execution] = min(out.get(s.execution, s.start_ns), s.start_ns)
    for s in sorted(spans, key=lambda s: s.start_ns):
        out.setdefault(s.execution, s.start_ns)
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _complete_spans(schedule: Schedule, records: dict) -> tuple[list[Span], list[int]]:
    spans = [s for s in match_spans(schedule, records) if s.index >= 0]
    by_exec, complete = group_executions(schedule, spans)
    keep = set(complete or by_exec)
    return [s for s in spans if s.execution in keep], sorted(keep)


def measured_timing(schedule: Schedule, records: dict) -> dict:
    """Per process, per action of its column: the median (start, end) in µs from the start
    of the execution (the driver's input write) over the complete executions, or None where
    nothing was recorded - :class:`~dagc.schedule.costs.Timing`'s ``measured``."""
    spans, _ = _complete_spans(schedule, records)
    t0 = _origins(spans)
    at: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for s in spans:
        at.setdefault((s.actor, s.index), []).append(
            (s.start_ns - t0[s.execution], s.end_ns - t0[s.execution])
        )
    out = {}
    for p in schedule.actors:
        col = []
        for i in range(len(schedule.of(p))):
            xs = at.get((p, i))
            col.append(
                (
                    round(_median([a for a, _ in xs]) / 1e3, 3),
                    round(_median([b for _, b in xs]) / 1e3, 3),
                )
                if xs
                else None
            )
        out[p] = tuple(col)
    return out


def _peer_index(schedule: Schedule, actor: str, a: Action) -> tuple[str, int] | None:
    """The action of another process that releases ``a`` (a read's write, a receive's
    send), as (process, index)."""
    if a.kind not in (Kind.RECV, Kind.CRECV, Kind.WAIT_RECV) or not a.peers:
        return None
    peer = a.peers[0]
    want = (Kind.SEND,) if a.kind == Kind.RECV else (Kind.CSEND, Kind.ISEND)
    for i, (_, y) in enumerate(schedule.of(peer)):
        if y.kind in want and y.value == a.value and actor in y.peers:
            return peer, i
    return None


def measured_costs(schedule: Schedule, records: dict) -> Costs:
    """Per action, what it costs by the profile (median over the complete executions, µs),
    named as :class:`~dagc.schedule.costs.Costs` names actions: a call's (or a write's, an
    issue's) duration; a read's time after the write it reads ended; a communicator
    transfer's (the receiving ``crecv``, or the ``wait`` of an overlapped receive) time
    after the sender started it. Each counts from the end of its process's previous action
    when it was not waiting, so the loop's own time between ops is in the costs (as the
    simulator runs a process's actions back to back). Waits on a peer are not costs: the
    simulator adds them."""
    from dagc.schedule.costs import cost_key, transfer_key

    spans, keep = _complete_spans(schedule, records)
    by = {(s.actor, s.index, s.execution): s for s in spans}
    vals: dict[str, list[float]] = {}
    eff: dict[tuple, float] = {}  # a span's cost by the rules above
    for s in spans:
        a = s.action
        if a is None:  # an unmatched span: _complete_spans keeps none
            continue
        prev = by.get((s.actor, s.index - 1, s.execution))
        start = min(s.start_ns, prev.end_ns) if prev is not None else s.start_ns
        rel = _peer_index(schedule, s.actor, a)
        if rel is not None:
            other = by.get((rel[0], rel[1], s.execution))
            if other is not None:
                # a read waits for the write to end, a blocking receive for the send to
                # start, an overlapped one for the isend to be issued (as the simulator)
                released = other.start_ns if a.kind == Kind.CRECV else other.end_ns
                start = max(start, released)
        dur = max(0, s.end_ns - start) / 1e3
        eff[(s.actor, s.index, s.execution)] = dur
        if a.kind == Kind.COLL:  # the last to arrive waits least
            key = cost_key(s.actor, a)
        elif a.kind in (Kind.CRECV, Kind.WAIT_RECV):
            key = transfer_key(s.actor, a.value, a.peers[0])
            if a.kind == Kind.WAIT_RECV:
                vals.setdefault(cost_key(s.actor, a), []).append(0.0)
        elif a.kind == Kind.WAIT_SEND:
            dur = 0.0
            key = cost_key(s.actor, a)
        else:
            key = cost_key(s.actor, a)
        vals.setdefault(key, []).append(dur)
    if any(a.kind == Kind.COLL for p in schedule.actors for _, a in schedule.of(p)):
        # a collective costs what its last participant to arrive spent in it
        for p in schedule.actors:
            for _, a in schedule.of(p):
                if a.kind != Kind.COLL:
                    continue
                per = []
                for n in keep:
                    ds = [
                        eff[(q, j, n)]
                        for q in schedule.actors
                        for j, (_, b) in enumerate(schedule.of(q))
                        if b.kind == Kind.COLL and b.group == a.group and (q, j, n) in eff
                    ]
                    if ds:
                        per.append(min(ds))
                if per:
                    vals[cost_key(p, a)] = per
    actions = {k: round(_median(v), 3) for k, v in sorted(vals.items()) if v}
    return Costs(
        actions=actions, call=0.0, move=0.0, unit="µs", source=f"profile of {len(keep)} executions"
    )

"""The scheduler's foresight, on hand-built IR (no Ray): costs, the simulator's predictions
(makespan, idle, bubble), reorder="critical-path" on @dagc.reorderable methods only, the
timing section of the schedule, and costs/timing measured from profile records."""

from collections import deque

import pytest

import dagc
from dagc.ir import DRIVER
from dagc.options import Options
from dagc.passes import PassContext, format_passes, run_passes
from dagc.pipelining import stage_orders, theoretical_bubble
from dagc.placement import REORDERABLE, ActorPlace, Placement
from dagc.schedule import Schedule
from dagc.schedule.costs import Costs, Timing, bubble, busy, makespan
from dagc.schedule.simulate import predict
from tests.helpers import column, make_ir


def lower(ir, overlap=False, reorder=None, reorderable=None, **options):
    """Every pass on one node; ``reorderable``: {actor: methods marked @dagc.reorderable}."""
    reorderable = reorderable or {}
    placement = Placement(
        driver_node="n0",
        actors={
            a.id: ActorPlace(node="n0", reorderable=tuple(reorderable.get(a.id, ())))
            for a in ir.actors
        },
    )
    opts = Options(overlap_communication=overlap, reorder=reorder, **options)
    ctx = PassContext(placement=placement, costs=opts.costs)
    return run_passes(ir, opts.passes(), ctx, callback=lambda p, x: x.verify())


def pipeline_ir(p, m, schedule, transport="nccl"):
    """The IR dagc.pipeline(...) traces to: P stages x M microbatches, bound per stage in
    the schedule's order (the same binding loop as dagc.pipelining.pipeline)."""
    orders = stage_orders(p, m, schedule)
    ops, fwd, bwd, transports = [], {}, {}, {}

    def new(actor, method, args):
        oid = f"t{len(ops)}"
        ops.append((oid, actor, method, args))
        return oid

    queues = [deque(o) for o in orders]
    while any(queues):
        for s, q in enumerate(queues):
            while q:
                kind, mb = q[0][0], int(q[0][1:])
                last = s == p - 1
                if kind == "F":
                    if s > 0 and (s - 1, mb) not in fwd:
                        break
                    x = f"${mb}" if s == 0 else fwd[(s - 1, mb)]
                    o = fwd[(s, mb)] = new(f"a{s}", "forward", [x, f"${m + mb}"] if last else [x])
                    if not last:
                        transports[o] = transport
                else:
                    if (s, mb) not in fwd or (not last and (s + 1, mb) not in bwd):
                        break
                    g = fwd[(s, mb)] if last else bwd[(s + 1, mb)]
                    o = bwd[(s, mb)] = new(f"a{s}", "backward", [g])
                    if s > 0:
                        transports[o] = transport
                q.popleft()
    finals = [
        new(
            f"a{s}",
            "step",
            [bwd[(0, i)] for i in range(m)] if s == 0 else [bwd[(s, int(orders[s][-1][1:]))]],
        )
        for s in range(p)
    ]
    return make_ir(
        ops, [fwd[(p - 1, i)] for i in range(m)] + finals, nfields=2 * m, transports=transports
    )


def order_matters_ir():
    """a0 makes a fast local result (bound first) and the input of a1's slow op (bound
    second): the benchmark DAG of benchmarks/bench.py's "reorder" case."""
    return make_ir(
        [("t0", "a0", "fast", ["$0"]), ("t1", "a0", "feed", ["$0"]), ("t2", "a1", "slow", ["t1"])],
        ["t0", "t2"],
    )


ORDER_COSTS = {"fast": 5, "feed": 1, "slow": 10}
PIPE_COSTS = {"forward": 1, "backward": 2, "step": 0}


# -- Costs ------------------------------------------------------------------------------------
def test_costs_uniform_by_default_and_from_a_dict():
    u = Costs.of(None)
    assert u.is_uniform and u == Costs.uniform()
    c = Costs.of({"fwd": 3, "a1 recv t0<a0": 0.5})
    assert c.methods == {"fwd": 3.0} and c.actions == {"a1 recv t0<a0": 0.5}
    assert not c.is_uniform and c.call == 0.0
    assert Costs.from_dict(c.to_dict()) == c
    assert "fwd: 3" in str(c)
    assert c.digest() == Costs.of({"a1 recv t0<a0": 0.5, "fwd": 3}).digest()
    for bad in ({"fwd": -1}, {"fwd": "x"}, {"fwd": True}, 3, "fast"):
        with pytest.raises(ValueError, match="cost"):
            Costs.of(bad)


def test_costs_from_anything_with_costs_method():
    class FakeProfile:
        def costs(self):
            return Costs(actions={"a0 fwd t0": 7.0}, call=0.0, unit="µs", source="profile")

    assert Costs.of(FakeProfile()).actions == {"a0 fwd t0": 7.0}


def test_compile_options_check_reorder_and_costs():
    from dagc.options import check_options

    assert check_options({"reorder": "critical-path"})["reorder"] == "critical-path"
    with pytest.raises(ValueError, match="reorder"):
        check_options({"reorder": "fastest"})
    with pytest.raises(ValueError, match="costs"):
        check_options({"costs": 12})


# -- the simulator predicts -------------------------------------------------------------------
def test_predicted_makespan_idle_and_bubble_of_a_chain():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"])
    s = lower(ir, costs={"f": 2, "g": 3}).schedule
    t = s.timing.predicted
    assert makespan(s, t) == 5.0  # 2 then 3, moving costs nothing
    assert busy(s, t, "a0") == 2.0 and busy(s, t, "a1") == 3.0
    assert bubble(s, t) == pytest.approx(1 - 5 / (2 * 5))
    # predict() gives the same from the schedule alone; other costs, other times
    assert predict(s, Costs.of({"f": 2, "g": 3})).predicted == t
    assert makespan(s, predict(s, Costs.of({"f": 1, "g": 1, "a1 recv t0<a0": 4})).predicted) == 6.0


def test_move_costs_count_on_the_path():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"], transports={"t0": "nccl"}
    )
    s = lower(ir, costs={"f": 1, "g": 1, "a1 crecv t0<a0": 10}).schedule
    assert makespan(s, s.timing.predicted) == 12.0


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 6)])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("overlap", [False, True])
def test_predicted_pipeline_bubble_is_the_theory(p, m, schedule, overlap):
    """Forward 1, backward 2, free transfers: the schedules reach (P-1)/(M+P-1) exactly,
    and the simulator says so - with overlap (receives issued early), and without it too:
    each blocking receive goes where its stage needs it, not where its value was made (a
    stage that blocks for microbatch m+1's activation before running m's backward idles;
    that was 1F1B's measured bubble of 0.39 against 0.20 at 2 x 4)."""
    s = lower(pipeline_ir(p, m, schedule), overlap=overlap, costs=PIPE_COSTS).schedule
    t = s.timing.predicted
    assert bubble(s, t, ("forward", "backward")) == pytest.approx(theoretical_bubble(p, m))
    assert makespan(s, t) == 3 * (m + p - 1)


def test_blocking_receive_waits_for_the_reader_not_at_the_top():
    """The last stage of 1F1B does not block for microbatch 1's activation before it ran
    microbatch 0's forward: with costs given, the receive goes where the simulator predicts
    the execution finishes first."""
    for costs in (PIPE_COSTS, None):  # given, and uniform
        col = column(lower(pipeline_ir(2, 4, "1f1b"), costs=costs).schedule, "a1")
        assert col.index("crecv t1<a0") > col.index("backward t3"), col
        # the communicator order is the one every participant keeps: F1 in, then B0 out
        assert col.index("crecv t1<a0") < col.index("csend t3>a0")


def test_timing_section_shown_with_costs_and_round_trips():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"])
    plain = lower(ir).schedule
    assert "timing" not in str(plain)  # uniform costs: nothing to show
    s = lower(ir, costs={"f": 2, "g": 3}).schedule
    text = str(s)
    assert "timing (units" in text and "makespan: predicted 5.0" in text
    assert "pred start" in text and "meas start" not in text
    assert Schedule.from_table(text) == s  # the section is for reading only
    back = Schedule.from_json(s.to_json())
    assert back == s and back.timing == s.timing
    assert Timing.from_dict(s.timing.to_dict()) == s.timing


def test_same_dag_and_costs_same_bytes():
    for overlap in (False, True):
        a = lower(pipeline_ir(3, 4, "1f1b"), overlap=overlap, costs=PIPE_COSTS).schedule
        b = lower(pipeline_ir(3, 4, "1f1b"), overlap=overlap, costs=PIPE_COSTS).schedule
        assert str(a) == str(b) and a.to_json() == b.to_json()


# -- reorder="critical-path" ------------------------------------------------------------------
def test_reorder_runs_the_critical_path_first_only_for_reorderable_methods():
    ir = order_matters_ir()
    bind = lower(ir, costs=ORDER_COSTS).schedule
    assert column(bind, "a0")[1:3] == ["fast t0", "send t0>driver"]
    # opted in, but nothing marked: bind order, never silently changed
    unmarked = lower(ir, reorder="critical-path", costs=ORDER_COSTS).schedule
    assert column(unmarked, "a0") == column(bind, "a0")
    # one of the two marked: still ordered against the other
    half = lower(
        ir, reorder="critical-path", reorderable={"a0": ["feed"]}, costs=ORDER_COSTS
    ).schedule
    assert column(half, "a0") == column(bind, "a0")
    # both marked: the feed of the slow consumer goes first, and the table says so
    s = lower(
        ir, reorder="critical-path", reorderable={"a0": ["fast", "feed"]}, costs=ORDER_COSTS
    ).schedule
    assert column(s, "a0")[1:3] == ["feed t1 (bind 1)", "send t1>a1"]
    assert "feed t1 (bind 1)" in str(s) and "fast t0 (bind 0)" in str(s)
    assert makespan(s, s.timing.predicted) == 11.0 < makespan(bind, bind.timing.predicted) == 16.0


def test_reorder_without_option_ignores_marks_and_keeps_golden_default():
    ir = order_matters_ir()
    marked = lower(ir, reorderable={"a0": ["fast", "feed"]}, costs=ORDER_COSTS).schedule
    assert column(marked, "a0") == column(lower(ir, costs=ORDER_COSTS).schedule, "a0")
    out = lower(ir, reorder="critical-path", reorderable={"a0": ["fast", "feed"]})
    assert "schedule-ops{reorder=critical-path}" in format_passes(
        Options(reorder="critical-path").passes()
    )
    assert ("reorder", "critical-path") in out.options
    assert format_passes(Options().passes()) == (
        "validate-graph,place-actors,assign-channels{buffer_size=1048576,max_inflight=8},"
        "lower-comm{communicator=auto},schedule-ops{reorder=bind}"
    )


def test_reorder_keeps_unmarked_calls_in_place():
    """An unmarked call between two marked ones is a barrier for both."""
    ir = make_ir(
        [
            ("t0", "a0", "a", ["$0"]),
            ("t1", "a0", "mid", ["$0"]),
            ("t2", "a0", "b", ["$0"]),
            ("t3", "a1", "slow", ["t2"]),
        ],
        ["t0", "t1", "t3"],
    )
    s = lower(
        ir,
        reorder="critical-path",
        reorderable={"a0": ["a", "b"]},
        costs={"a": 5, "mid": 1, "b": 1, "slow": 10},
    ).schedule
    calls = [c for c in column(s, "a0") if c.split()[0] in ("a", "mid", "b")]
    assert calls == ["a t0", "mid t1", "b t2"]


def test_reorderable_marks_the_function():
    def f(self, x):
        return x

    assert dagc.reorderable(f) is f and getattr(f, REORDERABLE) is True


# -- measured: costs and timing from profile records ------------------------------------------
def _records_of(s, spans_of):
    """Profile records for ``s``: ``spans_of(process, index, action, n)`` -> (start, end) µs."""
    recs = {}
    for p in s.actors:
        out = []
        col = list(s.of(p))
        for n in range(3):
            base = n * 1_000_000
            if p == DRIVER:
                w = next(i for i, (_, a) in enumerate(col) if a.kind.value == "send")
                r = max(i for i, (_, a) in enumerate(col) if a.kind.value == "recv")
                for i in (w, r):
                    a0, a1 = spans_of(p, i, col[i][1], n)
                    out.append((n, col[i][0], base + a0 * 1000, base + a1 * 1000))
                continue
            for i, (step, a) in enumerate(col):
                a0, a1 = spans_of(p, i, a, n)
                out.append((n, step, base + a0 * 1000, base + a1 * 1000))
        recs[p] = out
    return recs


def test_measured_costs_and_timing_from_records():
    from dagc.inspect.profile_stats import measured_costs, measured_timing, summary

    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"])
    s = lower(ir).schedule
    times = {
        ("driver", "send in>a0"): (0, 1),
        ("a0", "recv in<driver"): (-5, 2),
        ("a0", "f t0"): (2, 12),
        ("a0", "send t0>a1"): (12, 13),
        ("a1", "recv t0<a0"): (-5, 14),
        ("a1", "g t1"): (14, 44),
        ("a1", "send t1>driver"): (44, 45),
        ("driver", "recv t1<a1"): (1, 47),
    }
    recs = _records_of(s, lambda p, i, a, n: times[(p, str(a))])
    c = measured_costs(s, recs)
    assert c.unit == "µs" and c.source == "profile of 3 executions"
    assert c.actions["a0 f t0"] == 10 and c.actions["a1 g t1"] == 30
    assert c.actions["a1 recv t0<a0"] == 1  # after the write ended, not the wait
    assert c.actions["driver recv t1<a1"] == 2
    m = measured_timing(s, recs)
    assert m["a1"][1] == (14.0, 44.0)
    # predicted from those costs vs measured: the same makespan here
    again = lower(ir, costs=c).schedule
    pm = makespan(again, again.timing.predicted)
    assert pm == pytest.approx(makespan(again, m), rel=0.2)
    assert "3 complete" in summary(s, recs)


def test_profile_summary_counts_multi_output_executions_complete():
    """The driver records its input write and its last output read only: an execution of
    a MultiOutputNode DAG is complete all the same (it used to say "none complete")."""
    from dagc.inspect.profile_stats import summary

    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["$0"])], ["t0", "t1"])
    s = lower(ir).schedule
    assert len(s.of(DRIVER)) == 3
    recs = _records_of(s, lambda p, i, a, n: (i * 10, i * 10 + 5))
    out = summary(s, recs)
    assert "none complete" not in out and "3 complete executions" in out


def test_timing_table_with_measured_beside_predicted():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"])
    s = lower(ir, costs={"a0 f t0": 10, "a1 g t1": 30}).schedule
    measured = {p: tuple((float(i), float(i + 1)) for i in range(len(s.of(p)))) for p in s.actors}
    t = s.timing.with_measured(measured, "median of 3 profiled executions")
    from dataclasses import replace

    text = str(replace(s, timing=t))
    assert "meas start" in text and "median of 3 profiled executions" in text
    assert "makespan: predicted 40.0" in text


def test_measured_collective_costs_what_the_last_to_arrive_spent():
    from dagc.inspect.profile_stats import measured_costs

    ir = make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a1", "f", ["$0"]),
            ("t2", "a0", "ar", ["t0"], {}, 1, "g0"),
            ("t3", "a1", "ar", ["t1"], {}, 1, "g0"),
        ],
        ["t2", "t3"],
    )
    s = lower(ir).schedule
    ends = {"a0": 10, "a1": 30}

    def spans(p, i, a, n):
        if p == DRIVER:
            return (0, 1) if a.kind.value == "send" else (1, 40)
        kind = a.kind.value
        if kind == "recv":
            return (-5, 1)
        if kind == "call":
            return (1, ends[p])
        if kind == "coll":
            return (ends[p], 35)
        return (35, 36)

    c = measured_costs(s, _records_of(s, spans))
    assert c.actions["a0 allreduce.sum t2"] == c.actions["a1 allreduce.sum t3"] == 5
    assert c.actions["a1 f t1"] == 29

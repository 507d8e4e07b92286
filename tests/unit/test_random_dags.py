"""Random DAGs (tests/random_dags.py) through every pass and codegen, without Ray: the IR
verifies after each pass, the schedule keeps each actor's bind order, is proven free of
deadlock, reads back from its text, JSON and CSV, and the generated modules compile and
bind every name they read. Lowering twice gives the same bytes.

A few dozen examples by default (derandomized: the same ones every run); ``pytest -m fuzz``
runs many more (``DAGC_FUZZ_EXAMPLES``). A failure prints the DAG as code to paste.
"""

import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import dagc
from dagc.codegen import render_all
from dagc.options import Options
from dagc.passes import PassContext, run_passes
from dagc.placement import Placement
from dagc.schedule import OP_KINDS, Schedule
from dagc.schedule.simulate import comm_order, simulate
from tests.random_dags import AllReduce, Call, DagSpec, FakeActor, dag_specs, fuzz_settings
from tests.unit.test_loop_names import unbound_reads

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(3600)]


def traced_of(spec):
    build, _ = spec.functions()
    return dagc.trace(build(*[FakeActor(i) for i in range(spec.n_actors)]))


def bind_orders(spec, traced) -> dict[str, list[str]]:
    """Each IR actor's methods in the spec's bind order (allreduce parts included)."""
    ir_actor = {h._fake_index: aid for aid, h in traced.side.handles.items()}
    out: dict[str, list[str]] = {aid: [] for aid in ir_actor.values()}
    actor_of = []  # value id -> spec actor
    for s in spec.statements:
        if isinstance(s, AllReduce):
            for v in s.inputs:
                out[ir_actor[actor_of[v]]].append(f"allreduce.{s.op}")
            actor_of.extend(actor_of[v] for v in s.inputs)
        else:
            out[ir_actor[s.actor]].append(s.method)
            actor_of.append(s.actor)
    return out


def lower_and_check(spec, overlap: bool, nodes: int):
    traced = traced_of(spec)
    traced.ir.verify()
    n_values = sum(len(s.inputs) if isinstance(s, AllReduce) else 1 for s in spec.statements)
    assert len(list(traced.ir.ops())) == n_values
    assert len(traced.ir.output.refs) == len(spec.outputs)
    placement = Placement.spread(traced.actor_ids, nodes=nodes)
    ctx = PassContext(placement=placement)
    ir = run_passes(
        traced.ir,
        Options(overlap_communication=overlap).passes(),
        ctx,
        callback=lambda p, x: x.verify(),
    )
    s = ir.schedule
    if currently_in_test_context():  # under @given: printed if it fails
        note(f"schedule:\n{s}")
    assert s.simulated_steps is not None
    for aid, methods in bind_orders(spec, traced).items():
        assert [a.method for _, a in s.of(aid) if a.kind in OP_KINDS] == methods, aid
    # what the table shows is the program that runs: every column in step order
    back = Schedule.from_table(str(s))
    assert back == s and str(back) == str(s)
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_csv(s.to_csv()) == s
    simulate(back, executions=3, order=comm_order(ir))  # DeadlockError if it can hang
    for name, mod in render_all(ir, origin="tests/random_dags.py").items():
        compile(mod.source, f"{name}.py", "exec")
        assert unbound_reads(mod.source) == [], (name, mod.source)
    return ir


def test_random_dags_lower_verify_and_round_trip(request):
    @fuzz_settings(request.config, 40, 3000)
    @given(spec=dag_specs(), overlap=st.booleans(), nodes=st.integers(1, 2))
    def check(spec, overlap, nodes):
        lower_and_check(spec, overlap, nodes)

    check()


def test_random_dags_lower_deterministically(request):
    @fuzz_settings(request.config, 15, 500)
    @given(spec=dag_specs(), overlap=st.booleans())
    def check(spec, overlap):
        a = traced_of(spec).lower(overlap_communication=overlap)
        b = traced_of(spec).lower(overlap_communication=overlap)
        assert a.traced.as_text() == b.traced.as_text()
        assert a.as_text() == b.as_text() and a.sources() == b.sources()

    check()


def test_failure_prints_the_dag_as_code_that_builds_it():
    """What a failing example prints is Python that builds the same DAG."""
    spec = _one_spec()
    code = repr(spec)
    assert "def build(a0, a1):" in code and "def with_ray(a0, a1, inp):" in code
    assert "allreduce.bind([v0, v1])" in code and "with_tensor_transport('nccl')" in code
    ns: dict = {}
    exec(compile(code, "<pasted>", "exec"), ns)  # imports and all
    again = dagc.trace(ns["build"](FakeActor(0), FakeActor(1)))
    assert again.as_text() == traced_of(spec).as_text()


def _one_spec():
    return DagSpec(
        2,
        (
            Call(0, "vec", (("inp", 0),), transport="nccl"),
            Call(1, "vec", (("inp", "k"),)),
            AllReduce((0, 1)),
            Call(0, "mix", (("v", 2),), (("y", ("v", 3)), ("w", ("c", 2)))),
        ),
        outputs=(4,),
        multi=False,
    )


# -- what the random DAGs found ----------------------------------------------------------


def test_overlap_keeps_each_column_in_step_order():
    """Found by the random DAGs: overlap hoisted a receive above earlier actions of its column
    but kept its later step, so the table printed another program than the one that ran."""
    # a1 reads the input, then a tensor of a0 through the communicator: its icrecv goes to
    # the front of a1's column with the step of the crecv it replaces
    spec = DagSpec(
        2,
        (
            Call(0, "vec", (("inp",),), transport="nccl"),
            Call(1, "step", (("inp",),)),
            Call(1, "mix", (("v", 0),)),
        ),
        outputs=(1, 2),
        multi=True,
    )
    s = lower_and_check(spec, overlap=True, nodes=1).schedule
    for actor in s.actors:
        column = [f"{e.step} {e.action}" for e in s.of(actor)]
        assert [e.step for e in s.of(actor)] == sorted(e.step for e in s.of(actor)), column
    assert Schedule.from_table(str(s)) == s

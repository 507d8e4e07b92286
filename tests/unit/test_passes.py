"""Passes on hand-built IR: no Ray. Schedules are compared as tables of action strings."""

import textwrap

import pytest

from dagc.errors import CompileError, DeadlockError
from dagc.ir import DRIVER, Ref
from dagc.options import Options
from dagc.passes import format_passes, parse_passes
from dagc.schedule import OP_KINDS, Action, Kind, Schedule
from dagc.schedule.simulate import simulate
from tests.helpers import column, compile_ir, make_ir


def chain(n=2):
    ops = [("t0", "a0", "fwd", ["$0"])]
    for i in range(1, n):
        ops.append((f"t{i}", f"a{i}", "fwd", [f"t{i - 1}"]))
    return make_ir(ops, [f"t{n - 1}"])


def test_chain_schedule_columns():
    s = compile_ir(chain(2)).schedule
    assert column(s, DRIVER) == ["send in>a0", "recv t1<a1"]
    assert column(s, "a0") == ["recv in<driver", "fwd t0", "send t0>a1"]
    assert column(s, "a1") == ["recv t0<a0", "fwd t1", "send t1>driver"]
    assert s.simulated_steps is not None


def test_local_edges_are_variables_not_channels():
    ir = make_ir(
        [("t0", "a0", "fwd", ["$0"]), ("t1", "a0", "g", ["t0"]), ("t2", "a1", "h", ["t1", "t0"])],
        ["t2"],
    )
    out = compile_ir(ir)
    values = sorted(str(c.value) for c in out.channels)
    assert values == ["in", "t0", "t1", "t2"]
    assert all(c.writer != r for c in out.channels for r in c.readers)
    assert column(out.schedule, "a0") == [
        "recv in<driver",
        "fwd t0",
        "send t0>a1",
        "g t1",
        "send t1>a1",
    ]


def test_fan_out_one_channel_many_readers():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a2", "g", ["t0"])],
        ["t1", "t2", "t0"],
    )
    out = compile_ir(ir)
    c = [c for c in out.channels if str(c.value) == "t0"]
    assert len(c) == 1 and c[0].readers == (DRIVER, "a1", "a2")
    assert column(out.schedule, DRIVER)[1:] == ["recv t1<a1", "recv t2<a2", "recv t0<a0"]


def test_revisited_actor_order_is_consistent():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a0", "h", ["t1", "t0"])],
        ["t2"],
    )
    s = compile_ir(ir).schedule
    assert column(s, "a0") == [
        "recv in<driver",
        "f t0",
        "send t0>a1",
        "recv t1<a1",
        "h t2",
        "send t2>driver",
    ]


def test_actor_without_inputs_is_paced_by_input_channel():
    ir = make_ir([("t0", "a0", "const", ["#0"]), ("t1", "a1", "g", ["t0", "$0"])], ["t1"])
    out = compile_ir(ir)
    inp = [c for c in out.channels if str(c.value) == "in"][0]
    assert inp.readers == ("a0", "a1")
    assert column(out.schedule, "a0")[0] == "recv in<driver"


def test_num_returns_splits_values():
    ir = make_ir([("t0", "a0", "pair", ["$0"], {}, 2), ("t1", "a1", "g", ["t0.1"])], ["t1", "t0.0"])
    out = compile_ir(ir)
    assert sorted(str(c.value) for c in out.channels) == ["in", "t0.0", "t0.1", "t1"]


def test_unused_op_is_compile_error():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "dangling", ["t0"]), ("t2", "a1", "g", ["t0"])],
        ["t2"],
    )
    with pytest.raises(CompileError, match="never used"):
        compile_ir(ir)


def test_output_of_raw_input_is_compile_error():
    ir = make_ir([("t0", "a0", "f", ["$0"])], ["t0", "$0"])
    with pytest.raises(CompileError, match="InputNode itself"):
        compile_ir(ir)


def test_tensor_edges_lower_to_comm_on_cpu_actors_as_gloo():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])],
        ["t1", "t0"],
        transports={"t0": "nccl"},
    )
    out = compile_ir(ir)
    comm = [c for c in out.channels if c.transport == "comm"]
    assert len(comm) == 1 and comm[0].readers == ("a1",)
    shm_for_driver = [c for c in out.channels if str(c.value) == "t0" and c.transport == "shm"]
    assert shm_for_driver and shm_for_driver[0].readers == (DRIVER,)
    assert [g.backend for g in out.comm_groups] == ["gloo"]
    s = out.schedule
    csend = [step for step, a in s.of("a0") if a.kind == Kind.CSEND][0]
    crecv = [step for step, a in s.of("a1") if a.kind == Kind.CRECV][0]
    assert csend == crecv  # a rendezvous shares one row


def test_nccl_requested_on_cpu_actors_is_compile_error():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"], transports={"t0": "nccl"}
    )
    with pytest.raises(CompileError, match="GPU"):
        compile_ir(ir, communicator="nccl")


def test_auto_picks_nccl_on_gpu_actors():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"], transports={"t0": "auto"}
    )
    out = compile_ir(ir, gpus=("a0", "a1"))
    assert [g.backend for g in out.comm_groups] == ["nccl"]


def test_bidirectional_exchange_and_collective_schedule_simulates():
    ir = make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a1", "f", ["$0"]),
            ("t2", "a1", "g", ["t0"]),
            ("t3", "a0", "g", ["t1"]),
            ("t4", "a0", "allreduce", ["t3"], {}, 1, "g0"),
            ("t5", "a1", "allreduce", ["t2"], {}, 1, "g0"),
        ],
        ["t4", "t5"],
        transports={"t0": "nccl", "t1": "nccl"},
    )
    out = compile_ir(ir)
    s = out.schedule
    colls = [step for p in ("a0", "a1") for step, a in s.of(p) if a.kind == Kind.COLL]
    assert len(set(colls)) == 1
    assert simulate(s) > 0


def table(text, sections=""):
    """A schedule written as its table (columns start under the dashes), plus sections."""
    return Schedule.from_table(
        textwrap.dedent(text).strip("\n") + "\n\n" + textwrap.dedent(sections).strip("\n")
    )


def test_simulator_catches_misordered_sends():
    # a0 sends x then receives y; a1 also sends y first: both block in their sends
    s = table("""
        step  a0           a1
        ----  -----------  -----------
        0     csend t0>a1  csend t1>a0
        1     crecv t1<a1  crecv t0<a0
        """)
    with pytest.raises(DeadlockError) as ei:
        simulate(s)
    assert "<-- stuck" in ei.value.table and "csend t0>a1" in ei.value.table


def test_simulator_catches_collective_order_mismatch():
    s = table("""
        step  a0                     a1
        ----  ---------------------  ---------------------
        0     allreduce.sum t0 [g0]  allreduce.sum t1 [g1]
        1     allreduce.sum t1 [g1]  allreduce.sum t0 [g0]
        """)
    with pytest.raises(DeadlockError):
        simulate(s)


def test_simulator_catches_read_before_write_cycle():
    s = table("""
        step  a0         a1
        ----  ---------  ---------
        0     recv t1<a1  recv t0<a0
        1     send t0>a1  send t1>a0

        channels:
          c0: t0 a0 -> a1 [shm, 8 x 1048576 B]
          c1: t1 a1 -> a0 [shm, 8 x 1048576 B]
        """)
    with pytest.raises(DeadlockError, match="deadlock"):
        simulate(s)


def test_overlap_hoists_receives_and_keeps_comm_order():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "pre", ["$0"]), ("t2", "a1", "g", ["t0", "t1"])],
        ["t2"],
        transports={"t0": "nccl"},
    )
    out = compile_ir(ir, overlap=True)
    col = column(out.schedule, "a1")
    assert col.index("icrecv t0<a0") < col.index("pre t1")
    assert col.index("wait t0<a0") < col.index("g t2")
    assert column(out.schedule, "a0")[-1] == "wait t0>a1"
    assert "isend t0>a1" in column(out.schedule, "a0")
    assert simulate(out.schedule) > 0


def two_reader_tensor_ir(to_driver=False):
    return make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a2", "g", ["t0"])],
        ["t1", "t2"] + (["t0"] if to_driver else []),
        transports={"t0": "nccl"},
    )


def test_overlap_waits_say_what_they_wait_for():
    """A tensor read by two actors: one wait_send naming both readers, one wait_recv each."""
    s = compile_ir(two_reader_tensor_ir(), overlap=True).schedule
    waits = [a for _, a in s.of("a0") if a.kind in (Kind.WAIT_SEND, Kind.WAIT_RECV)]
    assert waits == [Action(Kind.WAIT_SEND, Ref("t0"), peers=("a1", "a2"))]
    assert column(s, "a0")[-3:] == ["isend t0>a1", "isend t0>a2", "wait t0>a1,a2"]
    for r in ("a1", "a2"):
        w = [a for _, a in s.of(r) if a.kind in (Kind.WAIT_SEND, Kind.WAIT_RECV)]
        assert w == [Action(Kind.WAIT_RECV, Ref("t0"), peers=("a0",))]
        assert s.channel_of(r, w[0]).id == "c1"
        use = "g t1" if r == "a1" else "g t2"
        assert column(s, r)[:3] == ["icrecv t0<a0", "wait t0<a0", use]


COMM_C0 = """
    channels:
      c0: t0 a0 -> a1 [comm, 8 x 1048576 B]
    """


def test_simulator_refuses_a_wait_on_nothing_issued():
    assert (
        simulate(
            table(
                """
        step  a0           a1
        ----  -----------  ------------
        0     isend t0>a1  icrecv t0<a0
        1     wait t0>a1   wait t0<a0
        """,
                COMM_C0,
            )
        )
        > 0
    )
    # the old model's mistake: a receive-style wait on the writer, which issued no receive
    with pytest.raises(DeadlockError, match="waits do not match") as ei:
        simulate(
            table(
                """
            step  a0           a1
            ----  -----------  ------------
            0     isend t0>a1  icrecv t0<a0
            1     wait t0>a1   wait t0<a0
            2     wait t0<a1
            """,
                COMM_C0,
            )
        )
    assert "never issued" in ei.value.table
    with pytest.raises(DeadlockError, match="waits do not match") as ei:
        simulate(
            table(
                """
            step  a0           a1
            ----  -----------  ------------
            0     isend t0>a1  icrecv t0<a0
            1                  wait t0<a0
            """,
                COMM_C0,
            )
        )  # a send never waited
    assert "never waited on (isend t0>a1)" in ei.value.table
    with pytest.raises(DeadlockError, match="waits do not match"):  # waits for a2 too
        simulate(
            table(
                """
            step  a0             a1
            ----  -------------  ------------
            0     isend t0>a1    icrecv t0<a0
            1     wait t0>a1,a2  wait t0<a0
            """,
                COMM_C0,
            )
        )


def test_simulator_wait_send_waits_for_every_named_send():
    """a0 waits for its sends of t0 to a1 and a2, then sends t1 to a1. Fine while a1
    receives t0 first; when a1 first waits for t1, a0's wait never ends."""
    ok = table("""
        step  a0                        a1           a2
        ----  ------------------------  -----------  -----------
        0     isend t0>a1; isend t0>a2  crecv t0<a0  crecv t0<a0
        1     wait t0>a1,a2
        2     send t1>a1
        3                               recv t1<a0

        channels:
          c0: t0 a0 -> a1,a2 [comm, 8 x 1048576 B]
          c1: t1 a0 -> a1 [shm, 8 x 1048576 B]
        """)
    assert simulate(ok) > 0
    stuck = table("""
        step  a0                        a1           a2
        ----  ------------------------  -----------  -----------
        0     isend t0>a1; isend t0>a2
        1     wait t0>a1,a2
        2     send t1>a1
        3                               recv t1<a0
        4                               send t2>a2
        5                               crecv t0<a0  recv t2<a1
        6                                            crecv t0<a0

        channels:
          c0: t0 a0 -> a1,a2 [comm, 8 x 1048576 B]
          c1: t1 a0 -> a1 [shm, 8 x 1048576 B]
          c2: t2 a1 -> a2 [shm, 8 x 1048576 B]
        """)
    with pytest.raises(DeadlockError) as ei:
        simulate(stuck)
    assert "wait t0>a1,a2  <-- stuck (waits for a1,a2 to receive t0)" in ei.value.table


def test_pass_list_text_round_trip():
    passes = Options(overlap_communication=True).passes()
    text = format_passes(passes)
    assert text == (
        "validate-graph,place-actors,assign-channels{buffer_size=1048576,"
        "max_inflight=8},lower-comm{communicator=auto},schedule-ops{reorder=bind},"
        "overlap-comm"
    )
    assert parse_passes(text) == passes and format_passes(parse_passes(text)) == text
    with pytest.raises(ValueError, match="unknown pass"):
        parse_passes("validate-graph,frobnicate")


def test_passes_are_pure():
    ir = chain(3)
    before = str(ir)
    compile_ir(ir)
    assert str(ir) == before and ir.schedule is None


def test_internal_error_names_the_pass():
    from dataclasses import dataclass

    from dagc.passes import Pass, PassContext, run_passes

    @dataclass(frozen=True)
    class Broken(Pass):
        name = "broken"

        def run(self, ir, ctx):
            raise KeyError("x")

    with pytest.raises(CompileError, match="internal error in pass 'broken'"):
        run_passes(chain(2), (Broken(),), PassContext())


# -- bind order ----------------------------------------------------------------------------


def calls(sched, actor):
    """The actor's calls in order, as "method value" (bind positions left out)."""
    return [f"{a.method} {a.value}" for _, a in sched.of(actor) if a.kind in OP_KINDS]


def issue_example_ir():
    """The issue's DAG as the frontend numbers it (depth-first from the output):
    branch2 = a1.double_and_inc(a0.inc(inp)), branch1 = a0.double_and_inc(a1.inc(inp)),
    where a1 bound inc first and a0 (the actor bound second in the user's code) too."""
    return make_ir(
        [
            ("t0", "a0", "inc", ["$0"]),
            ("t1", "a1", "double_and_inc", ["t0"]),
            ("t2", "a1", "inc", ["$0"]),
            ("t3", "a0", "double_and_inc", ["t2"]),
        ],
        ["t1", "t3"],
        bind={"t2": 0, "t1": 1, "t3": 0, "t0": 1},
    )


def test_methods_of_an_actor_run_in_bind_order():
    s = compile_ir(issue_example_ir()).schedule
    assert calls(s, "a1") == ["inc t2", "double_and_inc t1"]
    assert calls(s, "a0") == ["double_and_inc t3", "inc t0"]
    table = str(s)  # the table says why t3 runs before t0
    assert "double_and_inc t3 (bind 0)" in table and "inc t0 (bind 1)" in table
    assert Schedule.from_json(s.to_json()) == s and Schedule.from_csv(s.to_csv()) == s


def test_bind_order_shown_only_where_it_differs_from_op_ids():
    s = compile_ir(chain(3)).schedule
    assert "(bind" not in str(s)
    assert "[bind" not in str(chain(3))
    assert "t0 = a0.inc($0) [bind 1]" in str(issue_example_ir())


def one_f_one_b_ir(transport=None, bind_order=True):
    """Two stages, two microbatches. Stage a1 is written 1F1B: fwd0, bwd0, fwd1, bwd1;
    the frontend numbers both forwards first (t2, t3), then the backwards (t4, t5)."""
    ops = [
        ("t0", "a0", "fwd", ["$0"]),
        ("t1", "a0", "fwd", ["$1"]),
        ("t2", "a1", "fwd", ["t0"]),
        ("t3", "a1", "fwd", ["t1"]),
        ("t4", "a1", "bwd", ["t2"]),
        ("t5", "a1", "bwd", ["t3"]),
        ("t6", "a0", "bwd", ["t4"]),
        ("t7", "a0", "bwd", ["t5"]),
    ]
    bind = {"t2": 0, "t4": 1, "t3": 2, "t5": 3} if bind_order else None
    tr = {x: transport for x in ("t0", "t1", "t4", "t5")} if transport else None
    return make_ir(ops, ["t6", "t7"], nfields=2, transports=tr, bind=bind)


@pytest.mark.parametrize("transport,overlap", [(None, False), ("nccl", False), ("nccl", True)])
def test_hand_written_microbatch_order_stays_in_bind_order(transport, overlap):
    old = compile_ir(one_f_one_b_ir(transport, bind_order=False), overlap=overlap).schedule
    assert calls(old, "a1") == ["fwd t2", "fwd t3", "bwd t4", "bwd t5"]  # op-id order
    s = compile_ir(one_f_one_b_ir(transport), overlap=overlap).schedule
    assert calls(s, "a1") == ["fwd t2", "bwd t4", "fwd t3", "bwd t5"]
    assert calls(s, "a0") == ["fwd t0", "fwd t1", "bwd t6", "bwd t7"]
    assert simulate(s) > 0


def test_bind_order_contradicting_data_is_compile_error():
    # a0 binds h (t2) first, yet h needs t1 from a1, which needs f (t0), bound second on a0
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a0", "h", ["t1"])],
        ["t2"],
        bind={"t2": 0, "t0": 1},
    )
    with pytest.raises(CompileError) as ei:
        compile_ir(ir)
    msg = str(ei.value)
    assert not isinstance(ei.value, DeadlockError)
    assert (
        "a0:Stage.h (t2, bound 1st on a0) is bound before a0:Stage.f (t0, bound 2nd on a0)" in msg
    )
    assert "needs its result (t0 -> t1 -> t2)" in msg
    assert "Fix: bind a0:Stage.f before a0:Stage.h" in msg


def test_bind_order_contradiction_through_a_collective():
    # a0 binds its allreduce before g, but a1's allreduce input needs g's result
    ir = make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a0", "g", ["t0"]),
            ("t2", "a1", "h", ["t1"]),
            ("t3", "a0", "allreduce", ["t0"], {}, 1, "g0"),
            ("t4", "a1", "allreduce", ["t2"], {}, 1, "g0"),
        ],
        ["t3", "t4"],
        bind={"t0": 0, "t3": 1, "t1": 2},
    )
    with pytest.raises(
        CompileError,
        match=r"allreduce.sum \(t3, bound 2nd on a0\) is bound "
        r"before a0:Stage.g \(t1, bound 3rd on a0\)",
    ):
        compile_ir(ir)


def test_equal_bind_positions_leave_the_order_to_the_data():
    # two copies of one actor's handle both counted from 0: no order between t0 and t2
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a0", "h", ["t1"])],
        ["t2"],
        bind={"t2": 0, "t0": 0},
    )
    s = compile_ir(ir).schedule
    assert calls(s, "a0") == ["f t0", "h t2"]


# -- the pass contract ---------------------------------------------------------------------


def test_registry_lists_every_pass_in_compile_order():
    from dagc.passes import PASSES, REGISTRY

    assert [p.name for p in PASSES] == [
        "validate-graph",
        "place-actors",
        "assign-channels",
        "lower-comm",
        "schedule-ops",
        "overlap-comm",
    ]
    assert all(REGISTRY[p.name] is p for p in PASSES)


def test_each_pass_has_one_name_across_module_class_and_pass_list():
    """``assign_channels.py`` / ``AssignChannels`` / ``assign-channels``, for every pass."""
    from dagc.passes import PASSES

    for p in PASSES:
        module = p.__module__.rpartition(".")[2]
        assert module == p.name.replace("-", "_"), (p, module)
        assert p.__name__ == "".join(w.capitalize() for w in module.split("_")), p


def test_pass_modules_import_the_base_not_the_package():
    """No cycle dagc.passes <-> a pass: passes import dagc.passes.base, never the package."""
    import ast
    from pathlib import Path

    import dagc.passes

    for path in Path(dagc.passes.__file__).parent.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "dagc.passes", f"{path.name} imports dagc.passes"
            elif isinstance(node, ast.Import):
                assert all(a.name != "dagc.passes" for a in node.names), path.name


def test_pass_context_takes_a_placement_or_the_old_dict():
    from dagc.passes import PassContext
    from dagc.placement import ActorPlace, Placement

    old = PassContext(placement={"a0": ("n1", [0])}, driver_node="n0")
    assert old.placement == Placement("n0", {"a0": ActorPlace("n1", (0,))})
    assert PassContext(driver_node="n0").placement == Placement("n0")
    p = Placement("n0", {"a1": ActorPlace("n2")})
    assert PassContext(placement=p).placement is p


def test_place_copies_node_gpus_and_method_locations():
    ir = compile_ir(
        chain(2), gpus=("a1",), methods={"a0": {"fwd": "pipe.py:3 A.fwd", "aux": "pipe.py:9 A.aux"}}
    )
    a0, a1 = ir.actors
    assert (a0.node, a0.gpu_ids, a1.gpu_ids) == ("n0", (), (0,))
    assert a0.methods == (("aux", "pipe.py:9 A.aux"), ("fwd", "pipe.py:3 A.fwd"))
    assert a0.where("fwd") == "pipe.py:3 A.fwd" and a1.where("fwd") == "" and a1.methods == ()


def test_dagc_verify_checks_the_ir_after_every_pass(monkeypatch):
    from dataclasses import dataclass

    from dagc import config
    from dagc.passes import Pass, PassContext, run_passes

    @dataclass(frozen=True)
    class DropActors(Pass):
        name = "drop-actors"

        def run(self, ir, ctx):
            return ir.replace(actors=())

    monkeypatch.setattr(config, "VERIFY", False)
    run_passes(chain(2), (DropActors(),), PassContext())  # unchecked
    monkeypatch.setattr(config, "VERIFY", True)
    with pytest.raises(AssertionError, match="unknown actor a0"):
        run_passes(chain(2), (DropActors(),), PassContext())

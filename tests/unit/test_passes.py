"""Passes on hand-built IR: no Ray. Schedules are compared as tables of action strings."""
import pytest

from dagc.errors import CompileError, DeadlockError
from dagc.ir import DRIVER
from dagc.passes import parse_pipeline, pipeline_string, default_pipeline
from dagc.passes.simulate import simulate
from dagc.passes.overlap_comm import overlap
from dagc.schedule import Action, Schedule
from tests.helpers import column, compile_ir, make_ir


def chain(n=2):
    ops = [("t0", "a0", "fwd", ["$0"])]
    for i in range(1, n):
        ops.append((f"t{i}", f"a{i}", "fwd", [f"t{i-1}"]))
    return make_ir(ops, [f"t{n-1}"])


def test_chain_schedule_columns():
    s = compile_ir(chain(2)).schedule
    assert column(s, DRIVER) == ["send in>a0", "recv t1<a1"]
    assert column(s, "a0") == ["recv in<driver", "fwd t0", "send t0>a1"]
    assert column(s, "a1") == ["recv t0<a0", "fwd t1", "send t1>driver"]
    assert s.simulated_steps is not None


def test_local_edges_are_variables_not_channels():
    ir = make_ir([("t0", "a0", "fwd", ["$0"]), ("t1", "a0", "g", ["t0"]),
                  ("t2", "a1", "h", ["t1", "t0"])], ["t2"])
    out = compile_ir(ir)
    values = sorted(c.value for c in out.channels)
    assert values == ["in", "t0", "t1", "t2"]
    assert all(c.writer != r for c in out.channels for r in c.readers)
    assert column(out.schedule, "a0") == ["recv in<driver", "fwd t0", "send t0>a1", "g t1",
                                           "send t1>a1"]


def test_fan_out_one_channel_many_readers():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]),
                  ("t2", "a2", "g", ["t0"])], ["t1", "t2", "t0"])
    out = compile_ir(ir)
    c = [c for c in out.channels if c.value == "t0"]
    assert len(c) == 1 and c[0].readers == (DRIVER, "a1", "a2")
    assert column(out.schedule, DRIVER)[1:] == ["recv t1<a1", "recv t2<a2", "recv t0<a0"]


def test_revisited_actor_order_is_consistent():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]),
                  ("t2", "a0", "h", ["t1", "t0"])], ["t2"])
    s = compile_ir(ir).schedule
    assert column(s, "a0") == ["recv in<driver", "f t0", "send t0>a1", "recv t1<a1", "h t2",
                               "send t2>driver"]


def test_actor_without_inputs_is_paced_by_input_channel():
    ir = make_ir([("t0", "a0", "const", ["#0"]), ("t1", "a1", "g", ["t0", "$0"])], ["t1"])
    out = compile_ir(ir)
    inp = [c for c in out.channels if c.value == "in"][0]
    assert inp.readers == ("a0", "a1")
    assert column(out.schedule, "a0")[0] == "recv in<driver"


def test_num_returns_splits_values():
    ir = make_ir([("t0", "a0", "pair", ["$0"], {}, 2), ("t1", "a1", "g", ["t0.1"])],
                 ["t1", "t0.0"])
    out = compile_ir(ir)
    assert sorted(c.value for c in out.channels) == ["in", "t0.0", "t0.1", "t1"]


def test_unused_op_is_compile_error():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "dangling", ["t0"]),
                  ("t2", "a1", "g", ["t0"])], ["t2"])
    with pytest.raises(CompileError, match="never used"):
        compile_ir(ir)


def test_output_of_raw_input_is_compile_error():
    ir = make_ir([("t0", "a0", "f", ["$0"])], ["t0", "$0"])
    with pytest.raises(CompileError, match="InputNode itself"):
        compile_ir(ir)


def test_tensor_edges_lower_to_comm_on_cpu_actors_as_gloo():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1", "t0"],
                 transports={"t0": "nccl"})
    out = compile_ir(ir)
    comm = [c for c in out.channels if c.transport == "comm"]
    assert len(comm) == 1 and comm[0].readers == ("a1",)
    shm_for_driver = [c for c in out.channels if c.value == "t0" and c.transport == "shm"]
    assert shm_for_driver and shm_for_driver[0].readers == (DRIVER,)
    assert [g.backend for g in out.comm_groups] == ["gloo"]
    s = out.schedule
    csend = [a for a in s.of("a0") if a.kind == "csend"][0]
    crecv = [a for a in s.of("a1") if a.kind == "crecv"][0]
    assert csend.step == crecv.step          # a rendezvous shares one row


def test_nccl_requested_on_cpu_actors_is_compile_error():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"],
                 transports={"t0": "nccl"})
    with pytest.raises(CompileError, match="GPU"):
        compile_ir(ir, communicator="nccl")


def test_auto_picks_nccl_on_gpu_actors():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"],
                 transports={"t0": "auto"})
    out = compile_ir(ir, gpus=("a0", "a1"))
    assert [g.backend for g in out.comm_groups] == ["nccl"]


def test_bidirectional_exchange_and_collective_schedule_simulates():
    ir = make_ir([
        ("t0", "a0", "f", ["$0"]), ("t1", "a1", "f", ["$0"]),
        ("t2", "a1", "g", ["t0"]), ("t3", "a0", "g", ["t1"]),
        ("t4", "a0", "allreduce", ["t3"], {}, 1, "g0"),
        ("t5", "a1", "allreduce", ["t2"], {}, 1, "g0"),
    ], ["t4", "t5"], transports={"t0": "nccl", "t1": "nccl"})
    out = compile_ir(ir)
    s = out.schedule
    colls = [a for p in ("a0", "a1") for a in s.of(p) if a.kind == "coll"]
    assert len({a.step for a in colls}) == 1
    assert simulate(s) > 0


def test_simulator_catches_misordered_sends():
    # a0 sends x then receives y; a1 also sends y first: both block in their sends
    acts = {
        "a0": (Action(0, "a0", "csend", "t0", peers=("a1",), channel="c0"),
               Action(1, "a0", "crecv", "t1", peers=("a1",), channel="c1")),
        "a1": (Action(0, "a1", "csend", "t1", peers=("a0",), channel="c1"),
               Action(1, "a1", "crecv", "t0", peers=("a0",), channel="c0")),
    }
    s = Schedule(actors=("a0", "a1"), actions=acts)
    with pytest.raises(DeadlockError) as ei:
        simulate(s)
    assert "<-- stuck" in ei.value.table and "csend t0>a1" in ei.value.table


def test_simulator_catches_collective_order_mismatch():
    acts = {
        "a0": (Action(0, "a0", "coll", "t0", method="allreduce.sum", group="g0"),
               Action(1, "a0", "coll", "t1", method="allreduce.sum", group="g1")),
        "a1": (Action(0, "a1", "coll", "t1", method="allreduce.sum", group="g1"),
               Action(1, "a1", "coll", "t0", method="allreduce.sum", group="g0")),
    }
    with pytest.raises(DeadlockError):
        simulate(Schedule(actors=("a0", "a1"), actions=acts))


def test_simulator_catches_read_before_write_cycle():
    from dagc.ir import ChannelSpec
    chans = (ChannelSpec("c0", "t0", "a0", ("a1",)), ChannelSpec("c1", "t1", "a1", ("a0",)))
    acts = {
        "a0": (Action(0, "a0", "recv", "t1", peers=("a1",), channel="c1"),
               Action(1, "a0", "send", "t0", peers=("a1",), channel="c0")),
        "a1": (Action(0, "a1", "recv", "t0", peers=("a0",), channel="c0"),
               Action(1, "a1", "send", "t1", peers=("a0",), channel="c1")),
    }
    with pytest.raises(DeadlockError, match="deadlock"):
        simulate(Schedule(actors=("a0", "a1"), actions=acts, channels=chans))


def test_overlap_hoists_receives_and_keeps_comm_order():
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "pre", ["$0"]),
                  ("t2", "a1", "g", ["t0", "t1"])], ["t2"], transports={"t0": "nccl"})
    out = compile_ir(ir, overlap=True)
    col = column(out.schedule, "a1")
    assert col.index("icrecv t0<a0") < col.index("pre t1")
    assert col.index("wait t0") < col.index("g t2")
    assert "isend t0>a1" in column(out.schedule, "a0")
    assert simulate(out.schedule) > 0


def test_pipeline_string_round_trip():
    passes = default_pipeline(overlap=True)
    text = pipeline_string(passes)
    assert text == "validate,place,channels,lower-comm,schedule,overlap"
    assert pipeline_string(parse_pipeline(text)) == text
    with pytest.raises(ValueError, match="unknown pass"):
        parse_pipeline("validate,frobnicate")


def test_passes_are_pure():
    ir = chain(3)
    before = str(ir)
    compile_ir(ir)
    assert str(ir) == before and ir.schedule is None


def test_internal_error_names_the_pass():
    from dagc.passes import Pass, PassContext, run_pipeline
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Broken(Pass):
        name = "broken"

        def run(self, ir, ctx):
            raise KeyError("x")

    with pytest.raises(CompileError, match="internal error in pass 'broken'"):
        run_pipeline(chain(2), (Broken(),), PassContext())

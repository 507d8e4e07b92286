"""The IR's own contract: typed arguments that print and parse back, the sort keys."""

from dataclasses import replace

import pytest

from dagc.ir import (
    DRIVER,
    INPUT,
    Arg,
    CommGroup,
    Const,
    Field,
    Ref,
    op_sort_key,
    proc_key,
    value_key,
)
from dagc.schedule import Action, Entry
from tests.helpers import compile_ir, make_ir


@pytest.mark.parametrize(
    "text,arg",
    [
        ("t3", Ref("t3")),
        ("t3.1", Ref("t3", 1)),
        ("t12.0", Ref("t12", 0)),
        ("$0", Field(0)),
        ("#2", Const(2)),
        ("in", INPUT),
    ],
)
def test_args_print_and_parse_back(text, arg):
    assert Arg.parse(text) == arg and str(arg) == text
    assert Arg.parse(str(arg)) == arg


def test_refs_know_their_op_and_index():
    r = Ref("t3", 1)
    assert (r.op, r.index) == ("t3", 1) and Ref("t3").index is None and INPUT == Ref("in")
    assert Ref("t3") != Field(3) and len({Ref("t3"), Ref.parse("t3")}) == 1


@pytest.mark.parametrize("bad", ["", "$", "#x", "t3.", "t3.a", "3", "a b", "t3.1.2"])
def test_bad_args_are_refused(bad):
    with pytest.raises(ValueError):
        Arg.parse(bad)


def test_sort_keys():
    assert sorted(["t10", "t2", "t1"], key=op_sort_key) == ["t1", "t2", "t10"]
    values = [Ref("t10"), Ref("t2", 1), INPUT, Ref("t2"), Ref("t2", 0)]
    assert [str(v) for v in sorted(values, key=value_key)] == ["in", "t2", "t2.0", "t2.1", "t10"]
    assert sorted(["a10", "a2", DRIVER, "a1"], key=proc_key) == [DRIVER, "a1", "a2", "a10"]


# -- IR.verify: channels, communicator groups, the schedule ---------------------------------


def chain():
    return compile_ir(make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"])], ["t1"]))


def tensor(overlap=False):
    ir = make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a1", "g", ["t0"]),
            ("t2", "a2", "g", ["t0"]),
            ("t3", "a1", "allreduce", ["t1"], {}, 1, "g0"),
            ("t4", "a2", "allreduce", ["t2"], {}, 1, "g0"),
        ],
        ["t3", "t4"],
        transports={"t0": "nccl"},
    )
    return compile_ir(ir, overlap=overlap)


def failure(ir) -> str:
    with pytest.raises(AssertionError) as ei:
        ir.verify()
    return str(ei.value)


def with_channels(ir, channels):
    return ir.replace(
        channels=tuple(channels), schedule=replace(ir.schedule, channels=tuple(channels))
    )


def with_column(ir, actor, entries):
    return ir.replace(
        schedule=replace(ir.schedule, actions={**ir.schedule.actions, actor: tuple(entries)})
    )


def test_compiled_irs_verify():
    for ir in (chain(), tensor(), tensor(overlap=True)):
        ir.verify()


def test_error_prints_the_ir_and_the_marked_schedule():
    ir = chain()
    col = [e for e in ir.schedule.of("a1") if e.action.kind != "recv"]
    msg = failure(with_column(ir, "a1", col))
    assert msg.startswith("IR verification failed:\n")
    assert "\n--- IR ---\nactors: a0:Stage, a1:Stage\n" in msg
    assert "\n--- schedule ---\nstep  driver" in msg
    assert "g t1  <-- 'g t1' uses t0 before a1 has it" in msg
    assert "a1 reads t0 through c1 0 times, not once per execution" in msg


def test_channels_need_the_right_writer_readers_and_unique_ids():
    ir = chain()
    c0, c1, c2 = ir.channels
    assert "written by a1, but a0 makes it" in failure(
        with_channels(ir, [c0, replace(c1, writer="a1", readers=("a0",)), c2])
    )
    assert "channel id c0 used 2 times" in failure(
        with_channels(ir, [c0, replace(c1, id="c0"), c2])
    )
    msg = failure(with_channels(ir, [c0, c2]))
    assert "t1 on a1 reads t0, but no channel carries t0 to a1" in msg
    assert "'recv t0<a0': no channel carries t0 for a1" in msg
    assert "0 slots" in failure(with_channels(ir, [c0, replace(c1, slots=0), c2]))
    assert "are not sorted" in failure(
        with_channels(ir, [c0, replace(c1, readers=("a1", DRIVER)), c2])
    )
    assert "reaches a1 through 2 channels" in failure(
        with_channels(ir, [c0, c1, replace(c1, id="c9"), c2])
    )


def test_tensor_channels_and_collectives_name_a_group_with_their_ends():
    ir = tensor()
    assert [str(g) for g in ir.comm_groups] == ["k0: gloo over a0,a1,a2", "k1: gloo over a1,a2"]
    k0, k1 = ir.comm_groups
    assert "group k0 lacks a2" in failure(
        ir.replace(comm_groups=(replace(k0, members=("a0", "a1")), k1))
    )
    assert "names no communicator group ('k7')" in failure(
        with_channels(
            ir, [replace(c, communicator="k7") if c.transport == "comm" else c for c in ir.channels]
        )
    )
    assert "collective g0: group k0 is over a0,a1,a2, its participants are a1,a2" in failure(
        ir.replace(collectives=(("g0", "k0"),))
    )
    assert "collective g0 has no communicator group" in failure(ir.replace(collectives=()))
    assert "communicator group id k1 used twice" in failure(
        ir.replace(comm_groups=(k0, k1, CommGroup("k1", "gloo", ("a1", "a2"))))
    )


def test_sends_and_receives_pair_up_in_one_order():
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a0", "g", ["$0"]), ("t2", "a1", "h", ["t0", "t1"])],
        ["t2"],
        transports={"t0": "nccl", "t1": "nccl"},
    )
    ir = compile_ir(ir)
    col = list(ir.schedule.of("a1"))
    recvs = [i for i, e in enumerate(col) if e.action.kind == "crecv"]
    i, j = recvs
    col[i], col[j] = Entry(col[i].step, col[j].action), Entry(col[j].step, col[i].action)
    msg = failure(with_column(ir, "a1", col))
    assert "receives t1,t0 from a0, which sends t0,t1: not in one order" in msg


def test_waits_pair_with_what_they_wait_for():
    ir = tensor(overlap=True)
    col = [e for e in ir.schedule.of("a0") if e.action.kind != "wait_send"]
    assert "never waited on (isend t0>a1)" in failure(with_column(ir, "a0", col))
    bad = Entry(col[-1].step, Action.parse("wait t0>a1,a2,a3"))
    assert "waits on t0 a3, never issued before" in failure(
        with_column(ir, "a0", [*ir.schedule.of("a0"), bad])
    )


def test_the_schedule_calls_each_op_once_as_the_ir_says():
    ir = chain()
    col = list(ir.schedule.of("a0"))
    k = next(i for i, e in enumerate(col) if e.action.kind == "call")
    col[k] = Entry(col[k].step, Action.parse("h t0"))
    msg = failure(with_column(ir, "a0", col))
    assert "'h t0' is not the IR's t0 = a0.f($0)" in msg
    assert "'h t0' calls h, its calls entry f" in msg
    msg = failure(
        with_column(ir, "a0", [e for e in ir.schedule.of("a0") if e.action.kind != "call"])
    )
    assert "t0 (a0.f) is called 0 times in the schedule, not once" in msg


def test_writes_and_reads_happen_once_per_channel():
    ir = chain()
    col = list(ir.schedule.of("a0"))
    send = next(e for e in col if e.action.kind == "send")
    msg = failure(with_column(ir, "a0", col + [send]))
    assert "a0 writes t0 through c1 2 times, not once per execution" in msg

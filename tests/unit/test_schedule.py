"""Schedule data: actions that print and parse back, the table, JSON and CSV round trips."""

import json

import pytest

from dagc.ir import INPUT, Const, Field, Ref
from dagc.schedule import FORMAT, Action, Call, Entry, Kind, Schedule
from tests.helpers import compile_ir, make_ir


def sample():
    ir = make_ir(
        [
            ("t0", "a0", "f", ["$0", "#0"], {"k": "$1"}),
            ("t1", "a1", "g", ["t0"]),
            ("t2", "a0", "pair", ["t1"], {}, 2),
            ("t3", "a1", "h", ["t2.0", "t2.1"]),
        ],
        ["t3", "t1"],
        nfields=2,
    )
    return compile_ir(ir).schedule


def overlap_sample():
    """Overlap with a tensor read by two actors and the driver: both kinds of wait."""
    ir = make_ir(
        [("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]), ("t2", "a2", "g", ["t0"])],
        ["t1", "t2", "t0"],
        transports={"t0": "nccl"},
    )
    return compile_ir(ir, overlap=True).schedule


def collective_sample():
    ir = make_ir(
        [
            ("t0", "a0", "f", ["$0"]),
            ("t1", "a1", "pre", ["$0"]),
            ("t2", "a1", "g", ["t0", "t1"]),
            ("t3", "a0", "allreduce", ["t0"], {}, 1, "g0"),
            ("t4", "a1", "allreduce", ["t2"], {}, 1, "g0"),
        ],
        ["t3", "t4"],
        transports={"t0": "nccl"},
    )
    return compile_ir(ir).schedule


def bind_sample():
    ir = make_ir(
        [
            ("t0", "a0", "inc", ["$0"]),
            ("t1", "a1", "double_and_inc", ["t0"]),
            ("t2", "a1", "inc", ["$0"]),
            ("t3", "a0", "double_and_inc", ["t2"]),
        ],
        ["t1", "t3"],
        bind={"t2": 0, "t1": 1, "t3": 0, "t0": 1},
    )
    return compile_ir(ir).schedule


SAMPLES = {
    "plain": sample,
    "overlap": overlap_sample,
    "collective": collective_sample,
    "bind": bind_sample,
}

# every kind, as the table prints it
CELLS = {
    "recv t2<a0": Action(Kind.RECV, Ref("t2"), peers=("a0",)),
    "recv in<driver": Action(Kind.RECV, INPUT, peers=("driver",)),
    "fwd t3": Action(Kind.CALL, Ref("t3"), method="fwd"),
    "fwd t3 (bind 1)": Action(Kind.CALL, Ref("t3"), method="fwd", bind=1),
    "allreduce.sum t5 [g0]": Action(Kind.COLL, Ref("t5"), method="allreduce.sum", group="g0"),
    "allgather t5 [g1] (bind 0)": Action(
        Kind.COLL, Ref("t5"), method="allgather", group="g1", bind=0
    ),
    "send t3.1>a1,a2": Action(Kind.SEND, Ref("t3", 1), peers=("a1", "a2")),
    "csend t3>a1": Action(Kind.CSEND, Ref("t3"), peers=("a1",)),
    "crecv t3<a0": Action(Kind.CRECV, Ref("t3"), peers=("a0",)),
    "icrecv t3<a0": Action(Kind.ICRECV, Ref("t3"), peers=("a0",)),
    "isend t3>a1": Action(Kind.ISEND, Ref("t3"), peers=("a1",)),
    "wait t3<a0": Action(Kind.WAIT_RECV, Ref("t3"), peers=("a0",)),
    "wait t3>a1,a2": Action(Kind.WAIT_SEND, Ref("t3"), peers=("a1", "a2")),
}


@pytest.mark.parametrize("text", sorted(CELLS))
def test_actions_print_compactly_and_parse_back(text):
    a = CELLS[text]
    assert str(a) == text and Action.parse(text) == a and Action.parse(str(a)) == a
    assert Action.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_kinds_are_strings():
    assert Kind.RECV == "recv" and Kind.SEND == "send" and f"{Kind.WAIT_SEND}" == "wait_send"
    assert json.dumps(Kind.COLL) == '"coll"' and Action("recv", INPUT).kind is Kind.RECV
    assert str(Kind.CALL) == "call" and {Kind.COLL: 1}["coll"] == 1


def test_kind_members_are_named_as_their_values():
    assert [k.name for k in Kind] == [k.value.upper() for k in Kind]


@pytest.mark.parametrize(
    "bad", ["recv t2>a0", "send t2<a1", "fwd", "fwd t3 (bind x)", "recv 3<a0", "t3=fwd(t2)"]
)
def test_bad_actions_are_refused(bad):
    with pytest.raises(ValueError):
        Action.parse(bad)


def test_calls_print_and_parse_back():
    c = Call(Ref("t3"), "fwd", (Ref("t2", 1), Const(0)), (("k", Field(1)),), 2)
    assert str(c) == "t3 = fwd(t2.1, #0, k=$1) -> 2" and Call.parse(str(c)) == c
    assert Call.parse("t0 = f()") == Call(Ref("t0"), "f")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_table_json_and_csv_round_trip(name):
    s = SAMPLES[name]()
    assert Schedule.from_table(str(s)) == s
    assert str(Schedule.from_table(str(s))) == str(s)
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_json(s.to_json()).to_json() == s.to_json()
    back = Schedule.from_csv(s.to_csv())
    assert back == s and back.to_csv() == s.to_csv()


def test_table_has_step_rows_actor_columns_calls_and_channels():
    s = sample()
    lines = str(s).splitlines()
    assert lines[0].split() == ["step", "driver", "a0:Stage", "a1:Stage"]
    assert "send t0>a1" in lines[5] and "  t0 = f($0, #0, k=$1)" in lines
    assert "  t2 = pair(t1) -> 2" in lines and "channels:" in lines
    assert s.of("a0")[0] == Entry(1, Action.parse("recv in<driver"))


def test_details_name_the_arguments_and_the_channel():
    s = sample()
    t0 = Action.parse("f t0")
    assert s.call(Ref("t0")).args == (Field(0), Const(0))
    assert s.detail("a0", t0) == "t0 = f($0, #0, k=$1)"
    send = next(a for _, a in s.of("a0") if a.kind == Kind.SEND)
    assert s.detail("a0", send) == f"send t0>a1 via {s.channel_of('a0', send).id}"
    assert s.channel_of("a1", Action.parse("recv t0<a0")) == s.channel_of("a0", send)
    with pytest.raises(KeyError, match="no channel carries t9"):
        s.channel_of("a1", Action.parse("recv t9<a0"))


def test_wait_kinds_print_compactly():
    s = overlap_sample()
    kinds = {a.kind for p in s.actors for _, a in s.of(p)}
    assert {Kind.WAIT_RECV, Kind.WAIT_SEND, Kind.ISEND, Kind.ICRECV} <= kinds
    text = str(s)
    assert "wait t0>a1,a2" in text and "wait t0<a0" in text


def test_json_names_its_format_and_refuses_others():
    d = sample().to_dict()
    assert d["format"] == FORMAT == "dagc.schedule/2"
    assert d["actions"]["a0"][0] == {
        "step": 1,
        "kind": "recv",
        "value": "in",
        "method": "",
        "group": "",
        "peers": ["driver"],
        "bind": -1,
    }
    with pytest.raises(ValueError, match="dagc.schedule/1"):
        Schedule.from_dict(d | {"format": "dagc.schedule/1"})


def test_unknown_action_kind_is_refused_on_load():
    d = Action.parse("recv t2<a0").to_dict() | {"kind": "wait"}
    with pytest.raises(ValueError, match="unknown schedule action kind 'wait'"):
        Action.from_dict(d)


def test_an_entry_is_a_step_and_an_action():
    e = collective_sample().of("a0")[-2]
    assert (e.action.kind, e.action.group, e.step) == ("coll", "g0", e[0])
    assert str(e) == str(e.action)
    assert not hasattr(e, "kind")


def test_marks_in_table():
    s = sample()
    t = s.table({("a0", 1): "here"})
    assert "<-- here" in t

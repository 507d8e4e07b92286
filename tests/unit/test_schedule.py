"""Schedule data: printing, JSON and CSV round trips."""
import pytest

from dagc.schedule import Action, Schedule
from tests.helpers import compile_ir, make_ir


def sample():
    ir = make_ir([("t0", "a0", "f", ["$0", "#0"], {"k": "$1"}), ("t1", "a1", "g", ["t0"]),
                  ("t2", "a0", "pair", ["t1"], {}, 2),
                  ("t3", "a1", "h", ["t2.0", "t2.1"])], ["t3", "t1"], nfields=2)
    return compile_ir(ir).schedule


def test_table_has_step_rows_and_actor_columns():
    s = sample()
    lines = str(s).splitlines()
    assert lines[0].split() == ["step", "driver", "a0:Stage", "a1:Stage"]
    assert "channels:" in str(s)
    assert any("send t0>a1" in ln for ln in lines)


def test_json_round_trip():
    s = sample()
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_json(s.to_json()).to_json() == s.to_json()


def test_csv_round_trip():
    s = sample()
    back = Schedule.from_csv(s.to_csv())
    assert back == s
    assert back.to_csv() == s.to_csv()


def test_action_forms():
    a = Action(3, "a1", "call", "t3", method="fwd", args=("t2", "#0"), kwargs=(("k", "$1"),))
    assert str(a) == "fwd t3"
    assert a.detail() == "t3 = fwd(t2, #0, k=$1)"
    r = Action(2, "a1", "recv", "t2", peers=("a0",), channel="c1")
    assert str(r) == "recv t2<a0" and r.detail() == "recv t2<a0 via c1"
    assert Action.from_dict(a.to_dict()) == a


def overlap_sample():
    """Overlap with a tensor read by two actors and the driver: both kinds of wait."""
    ir = make_ir([("t0", "a0", "f", ["$0"]), ("t1", "a1", "g", ["t0"]),
                  ("t2", "a2", "g", ["t0"])], ["t1", "t2", "t0"], transports={"t0": "nccl"})
    return compile_ir(ir, overlap=True).schedule


def test_wait_kinds_print_compactly_and_round_trip():
    s = overlap_sample()
    kinds = {a.kind for p in s.actors for a in s.of(p)}
    assert {"wait_recv", "wait_send", "isend", "icrecv"} <= kinds
    text = str(s)
    assert "wait t0>a1,a2" in text and "wait t0<a0" in text
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_csv(s.to_csv()) == s
    assert Schedule.from_csv(s.to_csv()).to_csv() == s.to_csv()
    w = Action(4, "a0", "wait_send", "t0", peers=("a1", "a2"), channel="c1")
    assert str(w) == "wait t0>a1,a2" and w.detail() == "wait t0>a1,a2 via c1"
    r = Action(4, "a1", "wait_recv", "t0.1", peers=("a0",), channel="c1")
    assert str(r) == "wait t0.1<a0" and Action.from_dict(r.to_dict()) == r


def test_unknown_action_kind_is_refused_on_load():
    d = Action(1, "a1", "recv", "t2", peers=("a0",), channel="c1").to_dict() | {"kind": "wait"}
    with pytest.raises(ValueError, match="unknown schedule action kind 'wait'"):
        Action.from_dict(d)


def test_marks_in_table():
    s = sample()
    t = s.table({("a0", 1): "here"})
    assert "<-- here" in t

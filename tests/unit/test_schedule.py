"""Schedule data: printing, JSON and CSV round trips."""
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


def test_marks_in_table():
    s = sample()
    t = s.table({("a0", 1): "here"})
    assert "<-- here" in t

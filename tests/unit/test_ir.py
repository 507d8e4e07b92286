"""The IR's own contract: typed arguments that print and parse back, the sort keys."""
import pytest

from dagc.ir import DRIVER, INPUT, Arg, Const, Field, Ref, op_sort_key, proc_key, value_key


@pytest.mark.parametrize("text,arg", [("t3", Ref("t3")), ("t3.1", Ref("t3", 1)),
                                      ("t12.0", Ref("t12", 0)), ("$0", Field(0)),
                                      ("#2", Const(2)), ("in", INPUT)])
def test_args_print_and_parse_back(text, arg):
    assert Arg.parse(text) == arg and str(arg) == text
    assert Arg.parse(str(arg)) == arg


def test_refs_know_their_op_and_whole_value():
    r = Ref("t3", 1)
    assert (r.op, r.index, r.whole) == ("t3", 1, Ref("t3"))
    assert Ref("t3").whole == Ref("t3") and INPUT == Ref("in")
    assert Ref("t3") != Field(3) and len({Ref("t3"), Ref.parse("t3")}) == 1


@pytest.mark.parametrize("bad", ["", "$", "#x", "t3.", "t3.a", "3", "a b", "t3.1.2"])
def test_bad_args_are_refused(bad):
    with pytest.raises(ValueError):
        Arg.parse(bad)


def test_sort_keys():
    assert sorted(["t10", "t2", "t1"], key=op_sort_key) == ["t1", "t2", "t10"]
    values = [Ref("t10"), Ref("t2", 1), INPUT, Ref("t2"), Ref("t2", 0)]
    assert [str(v) for v in sorted(values, key=value_key)] == ["in", "t2", "t2.0", "t2.1",
                                                                 "t10"]
    assert sorted(["a10", "a2", DRIVER, "a1"], key=proc_key) == [DRIVER, "a1", "a2", "a10"]

"""The passes' contract: typed options parsed by field type, what each pass requires checked
before it runs, the header's pass list reproducing the compile, IR.verify() under tests."""

import re

import pytest

import dagc
from dagc import config
from dagc.codegen import render_all
from dagc.errors import CompileError
from dagc.options import DEFAULTS, Options
from dagc.passes import (
    PASSES,
    AssignChannels,
    LowerComm,
    OverlapComm,
    PassContext,
    ScheduleOps,
    format_passes,
    parse_passes,
    run_passes,
)
from dagc.placement import Placement
from tests.helpers import make_ir
from tests.random_dags import FakeActor


def chain(n=2):
    return make_ir(
        [(f"t{i}", f"a{i}", "fwd", ["$0" if i == 0 else f"t{i - 1}"]) for i in range(n)],
        [f"t{n - 1}"],
    )


# -- options: typed fields, defaults in one place ----------------------------------------------


def test_options_are_parsed_by_field_type():
    p = parse_passes(
        "assign-channels{buffer_size=4096,max_inflight=3},"
        "lower-comm{communicator=gloo,p2p=False},schedule-ops{reorder=critical-path}"
    )
    assert p == (
        AssignChannels(buffer_size=4096, max_inflight=3),
        LowerComm(communicator="gloo", p2p=False),
        ScheduleOps(reorder="critical-path"),
    )
    assert type(p[0].buffer_size) is int and p[1].p2p is False
    # "8" for a str field stays a str (not guessed to be an int)
    assert parse_passes("lower-comm{communicator=8}")[0].communicator == "8"


@pytest.mark.parametrize(
    "text, message",
    [
        ("assign-channels{buffer_size=big,max_inflight=3}", r"buffer_size='big' is not a int"),
        ("lower-comm{communicator=gloo,p2p=yes}", r"p2p='yes' is not a bool"),
        ("assign-channels{buffer_size=64}", r"'assign-channels' needs option\(s\) max_inflight"),
        ("schedule-ops{reorder=bind,speed=9}", r"unknown option 'speed=9'.*reorder"),
        ("overlap-comm{x=1}", r"unknown option 'x=1'; its options: none"),
    ],
)
def test_bad_pass_text_names_the_pass_and_option(text, message):
    with pytest.raises(ValueError, match=message):
        parse_passes(text)


def test_compile_option_defaults_live_in_options_only():
    """No pass holds a default for a compile option: the pass list of Options() carries
    them, and DEFAULTS is the same object's values."""
    from dataclasses import MISSING, fields

    for cls in PASSES:
        for f in fields(cls):
            if f.name in DEFAULTS:
                assert f.default is MISSING, f"{cls.name}.{f.name} copies a default"
    assert DEFAULTS == Options().as_dict()
    o = Options(
        buffer_size=4096,
        max_inflight=3,
        reorder="critical-path",
        overlap_communication=True,
        communicator="gloo",
    )
    assert format_passes(o.passes()) == (
        "validate-graph,place-actors,assign-channels{buffer_size=4096,max_inflight=3},"
        "lower-comm{communicator=gloo},schedule-ops{reorder=critical-path},overlap-comm"
    )
    with pytest.raises(AttributeError):
        o.buffer_size = 1  # frozen


def test_a_communicator_object_is_named_in_the_pass_list():
    class RayCpuLike:  # a communicator serving collectives only
        p2p = False

    lower = Options(communicator=RayCpuLike()).passes()[3]
    assert str(lower) == "lower-comm{communicator=custom-option,p2p=False}"


# -- requires / ensures ---------------------------------------------------------------------


def test_a_pass_missing_what_it_requires_is_named_with_the_fix():
    with pytest.raises(CompileError) as ei:
        run_passes(chain(), (ScheduleOps(reorder="bind"),), PassContext())
    msg = str(ei.value)
    assert "pass 'schedule-ops' requires channels (IR.channels)" in msg
    assert "run assign-channels before 'schedule-ops'" in msg and "dagc bug" not in msg
    with pytest.raises(CompileError, match="'overlap-comm' requires a schedule"):
        run_passes(chain(), Options().passes()[:4] + (OverlapComm(),), PassContext())


def test_requires_are_met_by_passes_recorded_in_the_ir():
    """A pass list resumed on an IR that earlier passes produced (``IR.passes``)."""
    passes = Options(overlap_communication=True).passes()
    ctx = PassContext(placement=Placement.local())
    half = run_passes(chain(3), passes[:4], ctx)
    done = run_passes(half, passes[4:], ctx)
    assert done.passes == tuple(str(p) for p in passes)
    whole = run_passes(chain(3), passes, ctx)
    assert str(done.schedule) == str(whole.schedule)


def test_every_pass_states_what_it_ensures_and_the_compile_order_meets_every_require():
    have: set = set()
    for cls in PASSES:
        assert cls.ensures, cls.name
        assert cls.requires <= have, (cls.name, cls.requires - have)
        have |= cls.ensures


# -- the header reproduces the compile ---------------------------------------------------------


def _dag(a, b, c):
    with dagc.InputNode() as inp:
        x = a.embed.bind(inp)
        return dagc.MultiOutputNode([b.head.bind(x), c.head.bind(x, inp)])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"buffer_size": 4096, "max_inflight": 3},
        {"reorder": "critical-path", "communicator": "gloo"},
    ],
)
def test_the_header_pass_list_reproduces_the_compile(options):
    traced = dagc.trace(_dag(FakeActor(0), FakeActor(1), FakeActor(2)))
    lowered = traced.lower(**options)
    header = re.search(r"^# passes: +(.*)$", lowered.modules["a0"].source, re.M).group(1)
    ir = run_passes(traced.ir, parse_passes(header), PassContext(placement=lowered.placement))
    again = render_all(ir, traced.origin)
    assert set(again) == set(lowered.modules)
    for name, m in lowered.modules.items():
        assert again[name].source == m.source, name
    if options:  # and the options are in it: the defaults' list gives other modules
        plain = run_passes(traced.ir, Options().passes(), PassContext(placement=lowered.placement))
        assert render_all(plain, traced.origin)["a0"].source != lowered.modules["a0"].source


# -- IR.verify() after every pass in the test suite --------------------------------------------


def test_the_test_suite_verifies_the_ir_after_every_pass():
    """tests/conftest.py sets DAGC_VERIFY=1, so every run_passes in every test verifies."""
    assert config.VERIFY

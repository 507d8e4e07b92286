"""dagc.inspect: graph text/pictures, HTML, profiling traces and artifacts. No Ray.

Schedules come from the real passes run on hand-built IRs; timing records come from a
tiny timing model (``synth_records``) that respects the schedule's data dependencies.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import networkx as nx
import pytest

from dagc.errors import DagcError
from dagc.inspect import (
    ArtifactsError,
    RenderUnavailableError,
    compiled_html,
    render,
    schedule_html,
    show,
    summary,
    summary_dict,
    timeline_json,
    to_ascii,
    to_dot,
    write_artifacts,
)
from dagc.inspect.graph import build_graph
from dagc.inspect.timeline import match_spans
from dagc.ir import CALL, COLLECTIVE, IR, ActorSpec, Arg, InputSpec, Op, OutputSpec, Ref
from dagc.options import Options
from dagc.passes import PassContext, run_passes
from dagc.schedule import Kind, Schedule

COLL, CRECV, CSEND, ICRECV, ISEND = Kind.COLL, Kind.CRECV, Kind.CSEND, Kind.ICRECV, Kind.ISEND
RECV, WAIT_RECV, SEND = Kind.RECV, Kind.WAIT_RECV, Kind.SEND

HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' program not installed")


# -- building schedules -------------------------------------------------------------------


def make_ir(ops, actors, output, multi=False) -> IR:
    g = nx.DiGraph()
    for op in ops:
        g.add_node(op.id, op=op)
        for a in op.refs():
            if isinstance(a, Ref):
                g.add_edge(a.op, op.id)
    return IR(
        graph=g,
        actors=tuple(ActorSpec(id=a, cls=c, name=a) for a, c in actors),
        inputs=InputSpec(fields=(0,), num_positional=1, direct=True),
        output=OutputSpec(refs=tuple(Arg.parse(r) for r in output), multi=multi),
    )


def compile_schedule(ir: IR, overlap: bool = False, placement=None) -> Schedule:
    ctx = PassContext(driver_node="n", placement=placement or {})
    return run_passes(ir, Options(overlap_communication=overlap).passes(), ctx).schedule


def call(op_id, actor, method, *args, **kw) -> Op:
    return Op(op_id, CALL, actor, method, tuple(Arg.parse(a) for a in args), **kw)


def chain_ir() -> IR:
    return make_ir(
        [call("t0", "a0", "fwd", "$0"), call("t1", "a1", "fwd", "t0")],
        [("a0", "Stage"), ("a1", "Stage")],
        ["t1"],
    )


def fanout_ir() -> IR:
    """a0.split -> (a1.left -> a1.post, a2.right); output [t3, t2, t0.0]."""
    return make_ir(
        [
            call("t0", "a0", "split", "$0", num_returns=2),
            call("t1", "a1", "left", "t0.0"),
            call("t2", "a2", "right", "t0.1"),
            Op("t3", CALL, "a1", "post", (Arg.parse("t1"),), kwargs=(("scale", Arg.parse("#0")),)),
        ],
        [("a0", "Src"), ("a1", "Worker"), ("a2", "Worker")],
        ["t3", "t2", "t0.0"],
        multi=True,
    )


def revisit_ir() -> IR:
    """a0.f -> a1.g -> a0.h(t1, t0): a0 is visited twice."""
    return make_ir(
        [
            call("t0", "a0", "f", "$0"),
            call("t1", "a1", "g", "t0"),
            call("t2", "a0", "h", "t1", "t0"),
        ],
        [("a0", "A"), ("a1", "B")],
        ["t2"],
    )


def tensor_ir() -> IR:
    return make_ir(
        [call("t0", "a0", "fwd", "$0", transport="nccl"), call("t1", "a1", "fwd", "t0")],
        [("a0", "S"), ("a1", "S")],
        ["t1", "t0"],
        multi=True,
    )


def collective_ir() -> IR:
    return make_ir(
        [
            call("t0", "a0", "f", "$0"),
            call("t1", "a1", "f", "$0"),
            Op("t2", COLLECTIVE, "a0", "allreduce.sum", (Arg.parse("t0"),), group="g0"),
            Op("t3", COLLECTIVE, "a1", "allreduce.sum", (Arg.parse("t1"),), group="g0"),
        ],
        [("a0", "W"), ("a1", "W")],
        ["t2", "t3"],
        multi=True,
    )


@pytest.fixture(scope="module")
def chain():
    return compile_schedule(chain_ir())


@pytest.fixture(scope="module")
def fanout():
    return compile_schedule(fanout_ir())


@pytest.fixture(scope="module")
def revisit():
    return compile_schedule(revisit_ir())


# -- synthetic timing records -------------------------------------------------------------

_SEND_FIRST = {SEND: 0, CSEND: 0, ISEND: 0}


def synth_records(schedule: Schedule, executions: int = 3, dur=None, extra=None) -> dict:
    """Records ``(n, step, start_ns, end_ns)`` per actor from a dependency-aware model.

    Each actor runs its actions in order; a receive starts when the actor is free and ends
    ``dur`` after the value was sent; a collective ends ``dur`` after its last participant
    arrives. ``dur(actor, action, n)`` gives each duration (default 1000 ns); ``extra[n]``
    delays every op of execution n. The driver writes the input and is not recorded.
    """
    dur = dur or (lambda actor, action, n: 1000)
    extra = extra or {}
    col = {a: i for i, a in enumerate(schedule.actors)}
    records: dict[str, list] = {}
    t = 1_000_000
    for n in range(executions):
        free = {a: t for a in schedule.actors}
        sent: dict[tuple, int] = {}
        acts = sorted(
            (
                (step, _SEND_FIRST.get(x.kind, 1), col[a], i, a, x)
                for a in schedule.actors
                for i, (step, x) in enumerate(schedule.of(a))
            ),
            key=lambda e: e[:4],
        )
        members = {
            x.group: [
                a
                for a in schedule.actors
                for _, y in schedule.of(a)
                if y.kind == COLL and y.group == x.group
            ]
            for a in schedule.actors
            for _, x in schedule.of(a)
            if x.kind == COLL
        }
        coll_arrive: dict[str, int] = {}
        for step, _, _, _, a, x in acts:
            start = free[a]
            d = dur(a, x, n) + extra.get(n, 0)
            if x.kind in (RECV, CRECV, ICRECV):
                cid = schedule.channel_of(a, x).id
                end = max(start, sent.get((cid, x.value), start)) + d
            elif x.kind == COLL:
                # every participant's earlier steps are done: the last one to arrive
                arrive = coll_arrive.setdefault(x.group, max(free[m] for m in members[x.group]))
                end = arrive + d
            else:
                end = start + d
            if x.kind in (SEND, CSEND, ISEND):
                sent[(schedule.channel_of(a, x).id, x.value)] = end
            free[a] = end
            if a != "driver":
                records.setdefault(a, []).append((n, step, start, end))
        t = max(free.values()) + 10_000
    return records


# -- graph: ascii and dot -----------------------------------------------------------------

CHAIN_ASCII = """\
dataflow graph: 2 ops, 3 edges
input   driver writes the input
t0      a0:Stage.fwd
          <- in (shm c0) from input
t1      a1:Stage.fwd
          <- t0 (shm c1) from a0:Stage.fwd
output  driver reads the results
          <- t1 (shm c2) from a1:Stage.fwd
"""


def test_ascii_chain(chain):
    assert to_ascii(chain) == CHAIN_ASCII
    assert render(chain, "ascii") == CHAIN_ASCII


def test_ascii_fanout_multi_output(fanout):
    text = to_ascii(fanout)
    lines = text.splitlines()
    assert lines[0] == "dataflow graph: 4 ops, 7 edges"
    # topological: input, split, then its consumers, output last
    order = [ln.split()[0] for ln in lines[1:] if not ln.startswith(" ")]
    assert order == ["input", "t0", "t1", "t2", "t3", "output"]
    assert "<- t0.0 (shm c1) from a0:Src.split" in text  # to a1 and to the driver
    assert "<- t0.1 (shm c2) from a0:Src.split" in text
    assert "<- t1 (local) from a1:Worker.left" in text  # same actor: a variable
    out_edges = text.split("output  driver reads the results\n")[1]
    assert out_edges.count("<-") == 3
    assert "t0.0 (shm c1)" in out_edges and "t2 (shm c3)" in out_edges


def test_ascii_revisited_actor(revisit):
    g = build_graph(revisit)
    assert [n.id for n in g.nodes] == ["input", "t0", "t1", "t2", "output"]
    assert {(e.src, e.value, e.transport) for e in g.incoming("t2")} == {
        ("t0", "t0", "local"),
        ("t1", "t1", "shm"),
    }
    assert g.node("t2").label == "a0:A.h"
    text = to_ascii(revisit)
    assert "t2      a0:A.h" in text


def test_graph_transports_tcp_and_comm():
    tcp = compile_schedule(chain_ir(), placement={"a1": ("n2", ())})
    assert "<- t0 (tcp c1) from a0:Stage.fwd" in to_ascii(tcp)
    assert '"t0" -> "t1" [label="t0 (tcp c1)", style=bold' in to_dot(tcp)
    for overlap in (False, True):
        comm = compile_schedule(tensor_ir(), overlap=overlap)
        text = to_ascii(comm)
        assert "<- t0 (comm c1) from a0:S.fwd" in text
        assert "<- t0 (shm c2) from a0:S.fwd" in text  # the driver's copy


def test_graph_collective_and_paced_reader():
    coll = compile_schedule(collective_ir())
    text = to_ascii(coll)
    assert "a0:W.allreduce.sum  [g0]" in text
    assert '"t2" -> "t3" [label="g0", style=dashed, dir=none' in to_dot(coll)
    # an actor that reads no input field is still paced by the input: edge to its first op
    paced = compile_schedule(
        make_ir(
            [Op("t0", CALL, "a0", "make", (Arg.parse("#0"),)), call("t1", "a1", "use", "t0")],
            [("a0", "Gen"), ("a1", "Use")],
            ["t1"],
        )
    )
    assert "t0      a0:Gen.make\n          <- in (shm c0) from input" in to_ascii(paced)


def test_dot_deterministic_and_from_json(fanout):
    again = compile_schedule(fanout_ir())
    assert to_dot(again) == to_dot(fanout)
    reloaded = Schedule.from_json(fanout.to_json())
    assert to_dot(reloaded) == to_dot(fanout)
    assert to_ascii(reloaded) == to_ascii(fanout)
    assert render(fanout, "dot") == to_dot(fanout)


def test_dot_content(fanout):
    dot = to_dot(fanout)
    assert dot.startswith("digraph dagc {\n") and dot.endswith("}\n")
    for actor, label in [("a0", "a0:Src"), ("a1", "a1:Worker"), ("a2", "a2:Worker")]:
        assert f'subgraph "cluster_{actor}" {{\n    label="{label}";' in dot
    assert '"t1" [label="a1:Worker.left\\nt1"];' in dot
    assert '"t1" -> "t3" [label="t1 (local)", style=dotted];' in dot
    assert '"t0" -> "output" [label="t0.0 (shm c1)", style=solid];' in dot
    assert '"input" [label="input", shape=oval];' in dot


def test_dot_quotes_odd_labels(chain):
    odd = dataclasses.replace(chain, labels=dict(chain.labels, a0='a0:We"ird\\'))
    dot = to_dot(odd)
    assert 'label="a0:We\\"ird\\\\";' in dot


@needs_dot
def test_render_svg_and_png(fanout, revisit):
    svg = render(fanout, "svg")
    assert isinstance(svg, str) and "<svg" in svg and "a1:Worker.left" in svg
    png = render(revisit, "png")
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_render_bad_format(chain):
    with pytest.raises(ValueError) as e:
        render(chain, "jpeg")
    for fmt in ("ascii", "dot", "svg", "png"):
        assert fmt in str(e.value)


def test_render_without_dot_program(chain, monkeypatch, tmp_path):
    pytest.importorskip("graphviz")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RenderUnavailableError) as e:
        render(chain, "svg")
    assert isinstance(e.value, RuntimeError)
    assert "pip install graphviz" in str(e.value) and "apt-get install graphviz" in str(e.value)
    # the notebook view falls back to the ascii graph
    page = compiled_html(chain)
    assert "<svg" not in page and "dataflow graph: 2 ops" in page


def test_render_without_graphviz_package(chain, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(RenderUnavailableError, match="pip install graphviz"):
        render(chain, "png")


# -- html ---------------------------------------------------------------------------------


def test_schedule_html(chain):
    page = schedule_html(chain)
    assert page == chain._repr_html_()
    assert "<th" in page and "a1:Stage" in page
    assert "recv t0&lt;a0" in page and "send t1&gt;driver" in page
    assert page.count("<tr>") == 1 + chain.num_steps + 1 + len(chain.channels)
    assert "8 x 1048576 B" in page and ">shm<" in page


def test_html_escapes_everything(chain):
    evil = dataclasses.replace(chain, labels=dict(chain.labels, a0="a0:<script>x&y</script>"))
    sources = {"a0": 'print("</pre><script>alert(1)</script>")\n', "driver": "x = 1 < 2\n"}
    for page in (schedule_html(evil), compiled_html(evil, sources)):
        assert "<script>" not in page
        assert "&lt;script&gt;x&amp;y&lt;/script&gt;" in page
    page = compiled_html(evil, sources)
    assert page.count("<details>") == 2
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)" in page and "x = 1 &lt; 2" in page
    assert page.index("driver generated source") < page.index(
        "a0:&lt;script&gt;x&amp;y&lt;/script&gt; generated source"
    )  # driver first


@needs_dot
def test_compiled_html_inlines_svg(fanout):
    page = compiled_html(fanout)
    assert "<svg" in page and "<?xml" not in page and "<details>" not in page


# -- profiling ----------------------------------------------------------------------------


def test_chrome_trace_structure(chain):
    records = synth_records(chain, executions=2)
    trace = timeline_json(chain, records)
    json.dumps(trace)  # JSON-able
    events = trace["traceEvents"]
    names = {
        e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"
    }
    assert sorted(names.values()) == ["a0:Stage", "a1:Stage"]  # one track per actor
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == sum(len(v) for v in records.values())
    assert min(e["ts"] for e in spans) == 0.0
    by_name = {(names[e["tid"]], e["name"], e["args"]["execution"]): e for e in spans}
    fwd = by_name[("a1:Stage", "fwd", 1)]
    assert fwd["args"] == {"execution": 1, "step": 5, "value": "t1", "op": "t1 = fwd(t0)"}
    assert fwd["dur"] == 1.0 and fwd["cat"] == "call"
    assert ("a1:Stage", "recv t0<a0", 0) in by_name
    assert ("a0:Stage", "send t0>a1", 0) in by_name
    t0 = min(r[2] for v in records.values() for r in v)
    rec = next(r for r in records["a1"] if r[0] == 1 and r[1] == 5)
    assert fwd["ts"] == (rec[2] - t0) / 1000


def test_chrome_trace_shared_steps_and_unknown_steps():
    sched = compile_schedule(tensor_ir(), overlap=True)
    a0 = sched.of("a0")
    shared = [x for x in a0 if x.step == a0[-1].step]
    assert len(shared) == 2  # "send t0>driver; wait t0>a1"
    records = synth_records(sched, executions=1)
    records["a0"].append((0, 99, 5_000_000, 5_000_100))  # a step the schedule lacks
    names = [e["name"] for e in timeline_json(sched, records)["traceEvents"] if e["ph"] == "X"]
    assert "send t0>driver" in names and "wait t0>a1" in names and "isend t0>a1" in names
    assert "step 99" in names
    spans = match_spans(sched, records)
    assert [s.action.kind for s in spans if s.actor == "a1" and s.action][:3] == [
        ICRECV,
        WAIT_RECV,
        CALL,
    ]


def test_chrome_trace_empty(chain):
    trace = timeline_json(chain, {})
    assert [e["name"] for e in trace["traceEvents"]] == ["process_name"]
    assert summary_dict(chain, {})["critical_path"] is None
    assert "critical path: no records" in summary(chain, {})


def test_summary_table(chain):
    records = synth_records(chain, executions=4, dur=lambda a, x, n: 1000 + 1000 * n)
    text = summary(chain, records)
    lines = text.splitlines()
    assert lines[0] == "per-op time over 4 executions (µs)"
    assert lines[1].split() == ["actor", "step", "action", "count", "mean", "p50", "p99"]
    row = next(ln for ln in lines if "fwd t1" in ln).split()
    # durations 1, 2, 3, 4 µs: mean 2.5, nearest-rank p50 = 2, p99 = 4
    assert row == ["a1:Stage", "5", "fwd", "t1", "4", "2.50", "2.00", "4.00"]
    d = summary_dict(chain, records)
    json.dumps(d)
    assert d["executions"] == d["complete_executions"] == 4
    assert len(d["ops"]) == sum(len(chain.of(a)) for a in ("a0", "a1"))


def test_critical_path_follows_the_slow_branch(fanout):
    slow = lambda a, x, n: 50_000 if str(x.value) == "t2" and x.kind == CALL else 1000
    d = summary_dict(fanout, synth_records(fanout, dur=slow))
    path = [(o["actor"], o["action"]) for o in d["critical_path"]["ops"]]
    assert path == [
        ("a0", "recv in<driver"),
        ("a0", "split t0"),
        ("a0", "send t0.0>driver,a1"),
        ("a0", "send t0.1>a2"),
        ("a2", "recv t0.1<a0"),
        ("a2", "right t2"),
        ("a2", "send t2>driver"),
    ]
    links = [o["via"] for o in d["critical_path"]["ops"]]
    assert links[0] == "" and links[4] == "t0.1 via c2 from a0" and links[5] == "same actor"
    cp = d["critical_path"]
    # recv in waits 1 µs for the driver's write; 5 more ops of 1 µs and right's 50 µs
    assert cp["busy_us"] == pytest.approx(2.0 + 5 * 1.0 + 50.0)
    assert cp["gaps_us"] == 0.0 and cp["ops"][4]["adds_us"] == 1.0
    assert cp["path_us"] == cp["span_us"]
    # slowing the other branch moves the path
    slow = lambda a, x, n: 50_000 if str(x.value) == "t1" and x.kind == CALL else 1000
    d = summary_dict(fanout, synth_records(fanout, dur=slow))
    assert [o["action"] for o in d["critical_path"]["ops"]][-3:] == [
        "left t1",
        "post t3",
        "send t3>driver",
    ]
    text = summary(fanout, synth_records(fanout, dur=slow))
    assert "critical path of execution" in text and "left t1" in text
    assert text.rstrip().splitlines()[-1].startswith("total: ")


def test_critical_path_revisited_actor_and_median_execution(revisit):
    extra = {0: 0, 1: 40_000, 2: 10_000, 3: 30_000, 4: 20_000}
    records = synth_records(revisit, executions=5, extra=extra)
    records["a0"].append((5, 1, 99_000_000, 99_000_500))  # a cut-off execution
    d = summary_dict(revisit, records)
    assert d["executions"] == 6 and d["complete_executions"] == 5
    cp = d["critical_path"]
    assert cp["execution"] == 4  # median span of 0..4
    assert "median end-to-end span of 5 complete executions" in cp["chosen"]
    assert [(o["actor"], o["action"]) for o in cp["ops"]] == [
        ("a0", "recv in<driver"),
        ("a0", "f t0"),
        ("a0", "send t0>a1"),
        ("a1", "recv t0<a0"),
        ("a1", "g t1"),
        ("a1", "send t1>a0"),
        ("a0", "recv t1<a1"),
        ("a0", "h t2"),
        ("a0", "send t2>driver"),
    ]
    assert cp["ops"][6]["via"] == "t1 via c2 from a1"
    assert cp["ops"][0]["start_us"] == 0.0


def test_critical_path_through_communicator_and_collective():
    comm = compile_schedule(tensor_ir())
    d = summary_dict(comm, synth_records(comm))
    vias = [o["via"] for o in d["critical_path"]["ops"]]
    assert "t0 via communicator from a0" in vias
    coll = compile_schedule(collective_ir())
    # both participants finish together; a1's allreduce waited for the slow a0
    slow = lambda a, x, n: 30_000 if a == "a0" and x.kind == CALL else 1000
    d = summary_dict(coll, synth_records(coll, dur=slow))
    ops = [(o["actor"], o["action"], o["via"]) for o in d["critical_path"]["ops"]]
    assert ops[-3:] == [
        ("a0", "f t0", "same actor"),
        ("a1", "allreduce.sum t3 [g0]", "collective g0 waits for a0"),
        ("a1", "send t3>driver", "same actor"),
    ]


# -- artifacts ----------------------------------------------------------------------------


def _sources(schedule: Schedule) -> dict[str, str]:
    return {a: f"# generated for {schedule.labels.get(a, a)}\n" for a in schedule.actors}


def test_write_artifacts_and_show(fanout, tmp_path):
    records = synth_records(fanout)
    trace = timeline_json(fanout, records)
    paths = write_artifacts(tmp_path / "out", fanout, _sources(fanout), trace)
    names = sorted(p.name for p in paths)
    assert names == [
        "a0.py",
        "a1.py",
        "a2.py",
        "driver.py",
        "graph.dot",
        "schedule.csv",
        "schedule.json",
        "schedule.txt",
        "trace.json",
    ]
    out = tmp_path / "out"
    assert (out / "schedule.txt").read_text() == str(fanout) + "\n"
    assert Schedule.from_json((out / "schedule.json").read_text()) == fanout
    assert Schedule.from_csv((out / "schedule.csv").read_text()) == fanout
    assert (out / "graph.dot").read_text() == to_dot(fanout)
    assert json.loads((out / "trace.json").read_text()) == trace
    assert (out / "a1.py").read_text() == "# generated for a1:Worker\n"
    assert show(out) == str(fanout)
    assert show(str(out)) == str(fanout)


def test_artifacts_byte_identical(tmp_path):
    for name in ("one", "two"):
        s = compile_schedule(revisit_ir())
        trace = timeline_json(s, synth_records(s))
        write_artifacts(tmp_path / name, s, _sources(s), trace)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        data = (tmp_path / "one" / name).read_bytes()
        assert data == (tmp_path / "two" / name).read_bytes(), name
        assert data.endswith(b"\n") and not data.endswith(b"\n\n"), name


def test_artifacts_without_trace_and_bad_names(chain, tmp_path):
    write_artifacts(tmp_path, chain, {"a0": "x = 1"})
    assert not (tmp_path / "trace.json").exists()
    assert (tmp_path / "a0.py").read_text() == "x = 1\n"
    with pytest.raises(ValueError, match="plain actor id"):
        write_artifacts(tmp_path, chain, {"../evil": "x"})


def test_show_errors(tmp_path):
    with pytest.raises(ArtifactsError, match="has no schedule.json") as e:
        show(tmp_path)
    assert isinstance(e.value, DagcError)
    with pytest.raises(DagcError, match="does not exist"):
        show(tmp_path / "missing")
    (tmp_path / "schedule.json").write_text("{not json")
    with pytest.raises(DagcError, match="is not a dagc schedule"):
        show(tmp_path)

"""The IR after each pass, as text, for a few DAGs (like xDSL's per-pass filecheck tests):
a change in what any pass produces shows up as a diff of one section of one file.

Regenerate after an intended change with:

    DAGC_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_pass_snapshots.py

and review the diff (git diff tests/golden/passes).
"""

import difflib
import os
from pathlib import Path

import pytest

from dagc.options import Options
from dagc.passes import PassContext, format_passes, run_passes
from dagc.placement import ActorPlace, Placement
from tests.unit.test_codegen import CASES

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "passes"
UPDATE = os.environ.get("DAGC_UPDATE_GOLDEN") == "1"

# name -> (test_codegen case, options, actors with a GPU)
SNAPSHOTS = {
    "chain": ("chain", Options(), ()),
    "fanout_tensor_overlap": (
        "fanout_tensor_overlap",
        Options(overlap_communication=True),
        ("a0", "a1", "a2"),
    ),
    "tensor_collective": ("tensor_overlap", Options(max_inflight=2, communicator="gloo"), ()),
}


def describe(ir) -> str:
    """The IR's text, plus what ``str(IR)`` leaves out on purpose (it feeds the graph hash,
    which must not hold node ids): where each actor is placed, each collective's group."""
    lines = [str(ir)]
    lines += [f"  {a.id} placed on {a.node} gpus={list(a.gpu_ids)}" for a in ir.actors if a.node]
    lines += [f"  collective {g} via {k}" for g, k in ir.collectives]
    return "\n".join(lines)


def snapshot(name: str) -> str:
    case, options, gpus = SNAPSHOTS[name]
    ir = CASES[case]()
    placement = Placement(
        driver_node="n0",
        actors={a.id: ActorPlace(node="n0", gpus=(0,) if a.id in gpus else ()) for a in ir.actors},
    )
    passes = options.passes()
    out = [f"// {name}: {format_passes(passes)}", "// -- input", describe(ir)]

    def after(p, x):
        out.extend([f"// -- after {p}", describe(x)])
        if x.schedule is not None and p.ensures & {"schedule", "overlapped"}:
            out.append(str(x.schedule))

    run_passes(ir, passes, PassContext(placement=placement), callback=after)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_ir_after_each_pass(name):
    text = snapshot(name)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing {path}; run DAGC_UPDATE_GOLDEN=1 pytest {__file__}"
    want = path.read_text()
    if text != want:
        diff = "".join(
            difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now")
        )
        pytest.fail(f"the IR after some pass changed:\n{diff}")


def test_every_pass_appears_in_some_snapshot():
    shown = {p.name for _, options, _ in SNAPSHOTS.values() for p in options.passes()}
    from dagc.passes import PASSES

    assert shown == {p.name for p in PASSES}

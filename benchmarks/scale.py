"""Compile-pipeline scale benchmark: synthetic IR -> passes -> codegen, no Ray, no actors.

The side-by-side cases (``bench.py``) compile DAGs of a few actors; this part asks how the
compiler itself grows. It builds dagc IR directly (the frontend needs live actor handles,
so it is left out), runs the default pass pipeline and renders every module, for DAGs of
``n`` actors with ``ops_per_actor`` ops each, in four shapes:

    chain     one long chain; each actor runs a block of consecutive ops (local edges
              inside a block, one shared-memory channel between blocks)
    chain-rr  one long chain whose ops go round-robin over the actors: every edge crosses
              processes (n * ops_per_actor channels, the longest dependency chain)
    fanout    the input goes to every actor; each runs its own chain of ops; the driver
              gathers every actor's last op (MultiOutputNode of n values)
    pipeline  pipeline parallelism: n stages x ops_per_actor microbatches; microbatch j
              reads input field j and flows stage 0 -> stage n-1; the driver gathers the
              last stage's microbatches

Run it alone::

    python benchmarks/scale.py [--sizes 10,100,1000] [--shapes chain,fanout] [--profile]

Each row gives the time of every pass and of codegen, the total, and the time per op; the
growth column compares the total with n log n scaling from the previous size (1.0 = exactly
n log n, >1 = faster growth). ``--profile`` runs cProfile on the biggest size of every
shape whose growth exceeds the limit and prints the functions that dominate.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import networkx as nx  # noqa: E402  (importable once ROOT is on sys.path)

from dagc.ir import CALL, IR, ActorSpec, Arg, InputSpec, Op, OutputSpec  # noqa: E402  (importable once ROOT is on sys.path)

SHAPES = ("chain", "chain-rr", "fanout", "pipeline")
TARGET_SECONDS = 2.0  # 1,000 actors x 10 ops, every shape
GROWTH_LIMIT = 1.5  # measured / (n log n) growth between sizes above this = flagged


# -- synthetic IR ---------------------------------------------------------------------------
def _ir(
    ops: list[tuple[str, str, tuple[str, ...]]], n_actors: int, outputs: list[str], nfields: int = 1
) -> IR:
    """ops: (op id, actor id, arg refs) in any order; builds the graph and specs."""
    g = nx.DiGraph()
    for oid, actor, args in ops:
        op = Op(
            id=oid, kind=CALL, actor=actor, method="fwd", args=tuple(Arg.parse(a) for a in args)
        )
        g.add_node(oid, op=op)
        for a in args:
            if a.startswith("t"):
                g.add_edge(a.split(".", 1)[0], oid)
    actors = tuple(ActorSpec(id=f"a{k}", cls="Stage", name=f"a{k}") for k in range(n_actors))
    return IR(
        graph=g,
        actors=actors,
        inputs=InputSpec(fields=tuple(range(nfields)), num_positional=nfields, direct=nfields == 1),
        output=OutputSpec(refs=tuple(Arg.parse(o) for o in outputs), multi=len(outputs) > 1),
    )


def make_dag(shape: str, n: int, ops_per_actor: int = 10) -> IR:
    """A synthetic DAG of ``n`` actors running ``ops_per_actor`` ops each (see module doc)."""
    m = ops_per_actor
    ops: list[tuple[str, str, tuple[str, ...]]] = []
    if shape in ("chain", "chain-rr"):
        prev = "$0"
        for i in range(n * m):
            actor = i // m if shape == "chain" else i % n
            ops.append((f"t{i}", f"a{actor}", (prev,)))
            prev = f"t{i}"
        return _ir(ops, n, [prev])
    if shape == "fanout":
        outs = []
        for k in range(n):
            prev = "$0"
            for j in range(m):
                oid = f"t{k * m + j}"
                ops.append((oid, f"a{k}", (prev,)))
                prev = oid
            outs.append(prev)
        return _ir(ops, n, outs)
    if shape == "pipeline":
        # op (stage k, microbatch j) = t{j * n + k}: numbered in microbatch-major order
        for j in range(m):
            for k in range(n):
                prev = f"${j}" if k == 0 else f"t{j * n + k - 1}"
                ops.append((f"t{j * n + k}", f"a{k}", (prev,)))
        return _ir(ops, n, [f"t{j * n + n - 1}" for j in range(m)], nfields=m)
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


# -- timing ---------------------------------------------------------------------------------
def compile_ir(ir: IR) -> tuple[IR, dict, dict[str, float]]:
    """The compile pipeline minus tracing and actors: passes, then codegen. Returns timings."""
    from dagc.codegen import render_all
    from dagc.options import Options
    from dagc.passes import PassContext, run_passes

    ctx = PassContext(driver_node="n0")
    t0 = time.perf_counter()
    out = run_passes(ir, Options().passes(), ctx)
    t1 = time.perf_counter()
    mods = render_all(out)
    t2 = time.perf_counter()
    timings = {k: v for k, v in ctx.timings.items()}
    timings["passes"] = t1 - t0
    timings["codegen"] = t2 - t1
    timings["total"] = t2 - t0
    return out, mods, timings


def measure(shape: str, n: int, ops_per_actor: int = 10, repeat: int = 1) -> dict:
    """Best-of-``repeat`` timings of compiling one synthetic DAG."""
    best = None
    for _ in range(repeat):
        ir = make_dag(shape, n, ops_per_actor)
        gc.collect()
        _, mods, t = compile_ir(ir)
        if best is None or t["total"] < best["total"]:
            best = t
    nops = n * ops_per_actor
    return {
        "shape": shape,
        "actors": n,
        "ops": nops,
        "modules": len(mods),
        "timings": best,
        "us_per_op": best["total"] / nops * 1e6,
    }


def nlogn(n: int) -> float:
    return n * math.log2(max(n, 2))


def growth(rows: list[dict]) -> None:
    """Annotate rows (one shape, increasing size) with growth relative to n log n."""
    for prev, row in zip(rows, rows[1:]):
        expect = nlogn(row["ops"]) / nlogn(prev["ops"])
        row["growth_vs_nlogn"] = (row["timings"]["total"] / prev["timings"]["total"]) / expect
        # the same, per stage, so a slow pass is named
        row["stage_growth"] = {
            k: (row["timings"][k] / prev["timings"][k]) / expect
            # stages under a few ms are too noisy to judge growth on
            for k in row["timings"]
            if prev["timings"].get(k, 0) > 2e-3 and row["timings"][k] > 10e-3
        }


def predict(rows: list[dict], n_ops: int) -> float:
    """Extrapolated total seconds at ``n_ops`` from the measured rows (at least n log n)."""
    done = [r for r in rows if "skipped" not in r]
    last = done[-1]
    k = 1.0
    if len(done) >= 2:
        a, b = done[-2], done[-1]
        if a["timings"]["total"] > 0 and b["ops"] > a["ops"]:
            k = math.log(b["timings"]["total"] / a["timings"]["total"]) / math.log(
                b["ops"] / a["ops"]
            )
    by_k = last["timings"]["total"] * (n_ops / last["ops"]) ** max(k, 1.0)
    return max(by_k, last["timings"]["total"] * nlogn(n_ops) / nlogn(last["ops"]))


def run(
    sizes=(10, 100, 1000),
    shapes=SHAPES,
    ops_per_actor: int = 10,
    repeat: int = 1,
    budget_s: float | None = None,
) -> dict:
    """Measure every shape at every size.

    ``budget_s`` bounds one measurement: a size whose extrapolated time (from the growth
    seen so far) exceeds it is not run, and its row says so, so a compiler that grows too
    fast cannot make the benchmark hang.
    """
    compile_ir(make_dag("chain", 2, 2))  # load and compile the templates once, untimed
    results = {}
    for shape in shapes:
        rows: list[dict] = []
        for n in sizes:
            nops = n * ops_per_actor
            if budget_s is not None and any("skipped" not in r for r in rows):
                guess = predict(rows, nops)
                if guess > budget_s:
                    rows.append(
                        {
                            "shape": shape,
                            "actors": n,
                            "ops": nops,
                            "predicted_s": guess,
                            "skipped": f"not run: extrapolated ~{guess:.0f} s "
                            f"> budget {budget_s:.0f} s",
                        }
                    )
                    continue
            rows.append(measure(shape, n, ops_per_actor, repeat))
        growth([r for r in rows if "skipped" not in r])
        results[shape] = rows
    at_target = [r for rows in results.values() for r in rows if r["actors"] >= 1000]
    too_fast = [
        r for rows in results.values() for r in rows if r.get("growth_vs_nlogn", 0) > GROWTH_LIMIT
    ]
    return {
        "ops_per_actor": ops_per_actor,
        "sizes": list(sizes),
        "shapes": results,
        "target": f"1,000 actors x 10 ops < {TARGET_SECONDS:.0f} s, growth <= n log n",
        # None: no 1,000-actor size was asked for, so the target was not judged
        "target_met": (
            None
            if not at_target
            else all(
                "skipped" not in r and r["timings"]["total"] < TARGET_SECONDS for r in at_target
            )
            and not too_fast
        ),
    }


STAGES = (
    "validate-graph",
    "place-actors",
    "assign-channels",
    "lower-comm",
    "schedule-ops",
    "codegen",
)


def table(res: dict) -> str:
    head = (
        f"{'shape':9} {'actors':>6} {'ops':>6} "
        + " ".join(f"{s:>10}" for s in STAGES)
        + f" {'total s':>8} {'us/op':>7} {'vs nlogn':>8}"
    )
    lines = [head, "-" * len(head)]
    for shape, rows in res["shapes"].items():
        for r in rows:
            if "skipped" in r:
                lines.append(f"{shape:9} {r['actors']:6d} {r['ops']:6d}  skipped: {r['skipped']}")
                continue
            t = r["timings"]
            g = r.get("growth_vs_nlogn")
            lines.append(
                f"{shape:9} {r['actors']:6d} {r['ops']:6d} "
                + " ".join(f"{t.get(s, 0.0) * 1e3:8.1f}ms" for s in STAGES)
                + f" {t['total']:8.3f} {r['us_per_op']:7.1f} "
                + (f"{g:8.2f}" if g is not None else f"{'-':>8}")
                + ("  <-- faster than n log n" if g and g > GROWTH_LIMIT else "")
            )
    verdict = {True: "MET", False: "MISSED", None: "not judged (no 1,000-actor size)"}
    lines.append(f"target: {res['target']}: {verdict[res['target_met']]}")
    return "\n".join(lines)


def slow_stages(res: dict) -> list[tuple[str, int, str]]:
    """(shape, actors, stage) whose growth from the previous size exceeds the limit."""
    out = []
    for shape, rows in res["shapes"].items():
        for r in rows:
            for st, g in r.get("stage_growth", {}).items():
                if st != "total" and st != "passes" and g > GROWTH_LIMIT:
                    out.append((shape, r["actors"], st))
    return out


def profile(shape: str, n: int, ops_per_actor: int = 10, top: int = 12) -> str:
    """cProfile one compile; the ``top`` functions by own time and by cumulative time."""
    ir = make_dag(shape, n, ops_per_actor)
    pr = cProfile.Profile()
    pr.enable()
    compile_ir(ir)
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top + 8)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="actor counts, comma-separated")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ops-per-actor", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="skip a size predicted to take longer than this many seconds",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the biggest size of every shape that grows too fast",
    )
    a = ap.parse_args(argv)
    res = run(
        tuple(int(s) for s in a.sizes.split(",")),
        tuple(a.shapes.split(",")),
        a.ops_per_actor,
        a.repeat,
        a.budget,
    )
    print(table(res))
    if a.profile:
        for shape, n, st in slow_stages(res):
            print(f"\n--- cProfile: {shape}, {n} actors (stage {st} grows faster than n log n)")
            print(profile(shape, n, a.ops_per_actor))
    return 0


if __name__ == "__main__":
    sys.exit(main())

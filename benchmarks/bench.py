"""dagc vs Ray Compiled Graph, side by side, on the same DAGs and the same actors.

    python benchmarks/bench.py [--quick] [--json out.json] [--cases echo1,chain2,...]
                               [--rounds N] [--no-scale | --scale-only]
    python benchmarks/bench.py --cluster [--quick] [--json out.json] [--cases x_chain2,...]

Every case of ``benchmarks/cases.py`` runs in alternating rounds, ``ray, dagc, ray, dagc,
...`` (at least three each), on one shared pool of warm actors. Each round builds the DAG
nodes afresh on those actors (Ray refuses to compile one DAG object twice), compiles it
with ``dag.experimental_compile()`` or ``dagc.compile(dag)``, measures, and tears it down.
Before every round the actors' CPU is sampled; a round starts only once they are idle, so
one system's leftover threads cannot slow the other's round (the sample is in the JSON).
The table gives the medians over rounds of both systems, the ratio dagc / ray, the
target and whether it is met. Then the compile-pipeline scale benchmark runs
(``benchmarks/scale.py``: passes + codegen alone on synthetic IR of 10 .. 1,000 actors).

With ``RAY_ADDRESS`` set it joins that cluster; otherwise it starts a local Ray.
``--cluster`` runs the cross-node cases instead: it starts a local Ray cluster of three
nodes in this process (head + node1 + node2, ``ray.cluster_utils.Cluster``), pins the actors
on node1 and node2, and shuts the whole cluster down at the end.

A case may run more than the two systems in its rounds (``Case.variants``, e.g. dagc with
``overlap_communication=True``, or Ray CG with another transport): every variant runs in
the same alternating rounds and is shown against Ray CG's median.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psutil  # noqa: E402  (importable once ROOT is on sys.path)

from benchmarks import cases as cases_mod  # noqa: E402  (importable once ROOT is on sys.path)
from benchmarks import scale  # noqa: E402  (importable once ROOT is on sys.path)

SYSTEMS = ("ray", "dagc")
RAY_GET_TIMEOUT_S = 60.0

QUICK = {
    "rounds": 3,
    "warmup": 200,
    "latency_n": 1000,
    "latency_n_big": 300,
    "throughput_n": 2000,
    "idle_check_s": 0.3,
    "idle_threshold": 5.0,
    "idle_wait_max_s": 10.0,
    "idle_delay_s": 1.0,
    "idle_sample_s": 2.0,
    "after_teardown_s": 1.0,
    "scale_sizes": (10, 100, 1000),
    "scale_budget_s": 10.0,
    # the CPU overlap case: one execution is a few 10s of ms, so far fewer of them
    "pipe_warmup": 5,
    "pipe_latency_n": 20,
    "pipe_throughput_n": 40,
}
FULL = {
    **QUICK,
    "rounds": 5,
    "warmup": 500,
    "latency_n": 5000,
    "latency_n_big": 1000,
    "throughput_n": 10000,
    "idle_check_s": 0.5,
    "scale_sizes": (10, 100, 300, 1000),
    "scale_budget_s": 60.0,
    "pipe_warmup": 10,
    "pipe_latency_n": 50,
    "pipe_throughput_n": 100,
}


# -- the two systems ------------------------------------------------------------------------
def _ray_get(ref):
    import ray

    return ray.get(ref)  # a CompiledDAGRef, or the list of them a MultiOutputNode gives


def _dagc_get(ref):
    # the same 60 s as Ray's: a hang ends the round as an error, not the whole benchmark
    return ref.get(timeout=RAY_GET_TIMEOUT_S)


def _is_timeout(res: dict) -> bool:
    e = res.get("error", "")
    return any(t in e for t in ("Timeout", "timed out", "did not finish within"))


def compile_with(system: str, dag, options: dict):
    if system == "ray":
        return dag.experimental_compile(**options)
    import dagc

    return dagc.compile(dag, **options)


GETTERS = {"ray": _ray_get, "dagc": _dagc_get}


# -- CPU sampling ---------------------------------------------------------------------------
def _cpu_seconds(procs) -> list[float]:
    out = []
    for p in procs:
        try:
            t = p.cpu_times()
            out.append(t.user + t.system)
        except psutil.Error:
            out.append(float("nan"))
    return out


def cpu_percent(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU% (100 = one core) over ``seconds`` of wall time."""
    procs = [psutil.Process(p) for p in pids]
    a = _cpu_seconds(procs)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = _cpu_seconds(procs)
    dt = time.monotonic() - t0
    return [round(100.0 * (y - x) / dt, 2) for x, y in zip(a, b)]


def wait_idle(pids: list[int], cfg: dict) -> dict:
    """Sample the actors until every one is under the threshold (or give up and say so)."""
    deadline = time.monotonic() + cfg["idle_wait_max_s"]
    waited = 0
    while True:
        cpu = cpu_percent(pids, cfg["idle_check_s"])
        if max(cpu) <= cfg["idle_threshold"] or time.monotonic() > deadline:
            return {"cpu": cpu, "idle": max(cpu) <= cfg["idle_threshold"], "checks": waited + 1}
        waited += 1


# -- running one case -----------------------------------------------------------------------
def run_round(case, run, actors: list, pids: list[int], cfg: dict) -> dict:
    """One compile + measure + teardown of ``run`` (a ``cases.Variant``: ray, dagc, ...)."""
    system = run.system
    pre = wait_idle(pids, cfg)
    res: dict = {
        "round_start_cpu": pre["cpu"],
        "started_idle": pre["idle"],
        "loadavg": os.getloadavg()[0],
    }
    idle_case = case.metric.startswith("idle_cpu")
    if idle_case:  # the actors' own CPU with no compiled DAG, sampled as long as the idle one
        res["baseline_cpu"] = cpu_percent(pids, cfg["idle_sample_s"])
    dag = case.make_dag(system, actors, run.build_arg)
    gc.collect()
    t0 = time.perf_counter()
    cg = compile_with(system, dag, run.options)
    res["compile_s"] = time.perf_counter() - t0
    if system == "dagc":  # which transports dagc picked (e.g. tcp across nodes, comm)
        try:
            res["transports"] = sorted({c.transport for c in cg.schedule.channels})
        except Exception as e:  # noqa: BLE001 - informational only
            res["transports"] = [f"? ({type(e).__name__})"]
    try:
        res.update(case.measure(cg, GETTERS[system], cfg))
        if "last_execution" in res:  # the idle-CPU case: sample while the DAG is alive
            last = res.pop("last_execution")
            time.sleep(max(0.0, last + cfg["idle_delay_s"] - time.monotonic()))
            idle = cpu_percent(pids, cfg["idle_sample_s"])
            res["idle_cpu_per_actor"] = idle
            res["idle_cpu"] = max(idle)
            res["idle_cpu_above_baseline"] = max(i - b for i, b in zip(idle, res["baseline_cpu"]))
    finally:
        t0 = time.perf_counter()
        cg.teardown()
        res["teardown_s"] = time.perf_counter() - t0
    if idle_case:
        time.sleep(0.5)
        res["after_teardown_cpu"] = max(cpu_percent(pids, cfg["after_teardown_s"]))
    return res


def _medians(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "error" not in r]
    med = {}
    if ok:
        for k, v in ok[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                med[k] = statistics.median(r[k] for r in ok if k in r)
    return med


def _paired(case, a_rounds: list[dict], b_rounds: list[dict], key: str, better: str):
    """Median over rounds of b / a (round r of each), or None."""
    ps = []
    for a, b in zip(a_rounds, b_rounds):
        av, bv = a.get(key), b.get(key)
        if av and bv is not None:
            ps.append(bv / av)
    return statistics.median(ps) if ps else None


def _ratio(a, b):
    return None if a in (None, 0) or b is None else b / a


def summarize(case, rounds: dict[str, list[dict]]) -> dict:
    out = {
        "name": case.name,
        "title": case.title,
        "metric": case.metric,
        "unit": case.unit,
        "better": case.better,
        "target": case.target,
        "target_text": case.target_text(),
        "absolute": case.absolute,
        "actors": case.actors,
        "note": case.note,
    }
    for system in SYSTEMS:
        out[system] = {
            "median": _medians(rounds[system]),
            "rounds": rounds[system],
            "errors": [r["error"] for r in rounds[system] if "error" in r],
        }
    rv = out["ray"]["median"].get(case.metric)
    dv = out["dagc"]["median"].get(case.metric)
    out["ray_value"], out["dagc_value"] = rv, dv
    out["ratio"] = case.ratio(rv, dv)
    # the same ratio per round (ray round r vs the dagc round right after it), whose median
    # is steadier than the ratio of medians when the machine's load drifts
    pairs = [
        case.ratio(r.get(case.metric), d.get(case.metric))
        for r, d in zip(rounds["ray"], rounds["dagc"])
    ]
    pairs = [p for p in pairs if p is not None]
    out["paired_ratio"] = statistics.median(pairs) if pairs and not case.absolute else None
    out["met"] = case.met(rv, dv)
    # more metrics of the same rounds: dagc / ray of each
    out["extra_metrics"] = [
        {
            "label": label,
            "key": key,
            "unit": unit,
            "better": better,
            "ray": out["ray"]["median"].get(key),
            "dagc": out["dagc"]["median"].get(key),
            "ratio": _ratio(out["ray"]["median"].get(key), out["dagc"]["median"].get(key)),
            "paired_ratio": _paired(case, rounds["ray"], rounds["dagc"], key, better),
        }
        for label, key, unit, better in case.extra_metrics
    ]
    # extra variants: each against the main run of the other system (a dagc variant vs
    # Ray CG, a Ray variant vs dagc: always dagc / ray), and a dagc variant vs plain dagc
    out["variants"] = {}
    metrics = [(case.metric, case.unit, case.better)] + [
        (key, unit, better) for _, key, unit, better in case.extra_metrics
    ]
    for v in case.variants:
        med = _medians(rounds[v.label])
        entry = {
            "title": v.title or v.label,
            "system": v.system,
            "options": v.options,
            "build_arg": v.build_arg,
            "median": med,
            "rounds": rounds[v.label],
            "errors": [r["error"] for r in rounds[v.label] if "error" in r],
            "metrics": {},
        }
        for key, _unit, better in metrics:
            val = med.get(key)
            if v.system == "dagc":
                vs_ray = _ratio(out["ray"]["median"].get(key), val)
                vs_ray_paired = _paired(case, rounds["ray"], rounds[v.label], key, better)
                own = _ratio(out["dagc"]["median"].get(key), val)  # variant / plain dagc
                speedup = None if own in (None, 0) else (1 / own if better == "lower" else own)
            else:
                vs_ray = _ratio(val, out["dagc"]["median"].get(key))
                vs_ray_paired = _paired(case, rounds[v.label], rounds["dagc"], key, better)
                speedup = None
            entry["metrics"][key] = {
                "value": val,
                "ratio_dagc_over_ray": vs_ray,
                "paired_ratio": vs_ray_paired,
                "speedup_vs_dagc": speedup,
            }
        out["variants"][v.label] = entry
    # the same DAG must compute the same numbers everywhere (cases that report a checksum)
    sums = [
        r[k] for rs in rounds.values() for r in rs for k in ("checksum", "checksum_last") if k in r
    ]
    if sums:
        ref = sums[0]
        out["checksum_ok"] = all(abs(x - ref) <= 1e-3 * max(1.0, abs(ref)) for x in sums)
    transports = sorted(
        {t for label, rs in rounds.items() for r in rs for t in r.get("transports", ())}
    )
    if transports:
        out["dagc_transports"] = transports
    return out


def run_case(case, actors: list, pids: list[int], cfg: dict, log) -> dict:
    runs = case.runs()
    rounds: dict[str, list[dict]] = {run.label: [] for run in runs}
    timed_out: dict[str, int] = {}
    for r in range(cfg["rounds"]):
        for run in runs:
            if run.label in timed_out:  # one hang per run and case is enough to know
                rounds[run.label].append(
                    {"round": r, "error": (f"skipped: round {timed_out[run.label]} timed out")}
                )
                continue
            try:
                res = run_round(case, run, actors, pids, cfg)
            except Exception as e:  # one failed round must not lose the others
                res = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=12),
                }
                log(f"  {case.name} round {r} {run.label} FAILED:\n{res['traceback']}")
            res["round"] = r
            rounds[run.label].append(res)
            if _is_timeout(res):
                timed_out[run.label] = r
            v = res.get(case.metric)
            more = "".join(
                f", {key} {fmt(res[key], unit)}"
                for _, key, unit, _ in case.extra_metrics
                if key in res
            )
            log(
                f"  {case.name:10} round {r} {run.label:4}: "
                + (fmt(v, case.unit) if v is not None else res.get("error", "?"))
                + more
                + ("" if res.get("started_idle", True) else "  (actors were busy at start)")
            )
    return summarize(case, rounds)


def first_compiles(actors: list, log) -> dict:
    """Compile a 1-actor echo once per system before any case: the cold compile time,
    and the time from the compile's start to the first execution's result (Ray CG
    leaves part of its set-up to the first execution)."""
    out = {}
    for system in SYSTEMS:
        dag = cases_mod.echo1(actors)
        t0 = time.perf_counter()
        cg = compile_with(system, dag, {})
        out[system] = time.perf_counter() - t0
        try:
            GETTERS[system](cg.execute(1))
            out[f"{system}_first_result"] = time.perf_counter() - t0
        finally:
            cg.teardown()
        log(
            f"  first compile ({system}, 1-actor echo, cold): {out[system]:.3f} s, "
            f"first result after {out[f'{system}_first_result']:.3f} s"
        )
    return out


# -- output ---------------------------------------------------------------------------------
def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "us":
        return f"{v:,.1f} us"
    if unit == "exec/s":
        return f"{v:,.0f} /s"
    if unit == "s":
        return f"{v * 1e3:,.1f} ms"
    if unit == "%":
        return f"{v:.2f} %"
    return f"{v:g}"


def table(results: list[dict]) -> str:
    head = (
        f"{'case':11} {'what':44} {'Ray CG':>13} {'dagc':>13} {'ratio':>7} "
        f"{'target':>18} {'met':>4} {'paired':>7}"
    )
    lines = [head, "-" * len(head)]
    for c in results:
        met = {True: "yes", False: "NO", None: "?"}[c["met"]]
        ratio = f"{c['ratio']:.3f}" if c["ratio"] is not None else "-"
        lines.append(
            f"{c['name']:11} {c['title'][:44]:44} {fmt(c['ray_value'], c['unit']):>13} "
            f"{fmt(c['dagc_value'], c['unit']):>13} {ratio:>7} "
            f"{c['target_text']:>18} {met:>4} "
            + (f"{c['paired_ratio']:7.3f}" if c.get("paired_ratio") is not None else f"{'-':>7}")
        )
        extra = []
        if c["metric"] == "p50":
            extra.append(("  p99", "p99", "us"))
        if c["name"] == "compile":
            extra.append(("  + first result", "first_result_s", "s"))
        if c["metric"] == "idle_cpu_above_baseline":
            extra.append(("  raw process CPU while idle", "idle_cpu", "%"))
            extra.append(("  CPU before the round (baseline)", None, "%"))
            extra.append(("  CPU after teardown", "after_teardown_cpu", "%"))
        for label, key, unit in extra:
            if key is None:
                rv = _median_max(c["ray"]["rounds"], "baseline_cpu")
                dv = _median_max(c["dagc"]["rounds"], "baseline_cpu")
            else:
                rv = c["ray"]["median"].get(key)
                dv = c["dagc"]["median"].get(key)
            lines.append(f"{'':11} {label:44} {fmt(rv, unit):>13} {fmt(dv, unit):>13}")
        for m in c.get("extra_metrics", ()):
            ratio = f"{m['ratio']:.3f}" if m["ratio"] is not None else "-"
            paired = f"{m['paired_ratio']:7.3f}" if m["paired_ratio"] is not None else f"{'-':>7}"
            lines.append(
                f"{'':11} {'  ' + m['label']:44} {fmt(m['ray'], m['unit']):>13} "
                f"{fmt(m['dagc'], m['unit']):>13} {ratio:>7} {'':18} {'':4} {paired}"
            )
        units = {
            c["metric"]: c["unit"],
            **{m["key"]: m["unit"] for m in c.get("extra_metrics", ())},
        }
        names = {
            c["metric"]: c["metric"],
            **{m["key"]: m["label"].split(",")[0] for m in c.get("extra_metrics", ())},
        }
        for v in c.get("variants", {}).values():
            for key, m in v["metrics"].items():
                val = fmt(m["value"], units[key])
                cols = f"{'-':>13} {val:>13}" if v["system"] == "dagc" else f"{val:>13} {'-':>13}"
                ratio = (
                    f"{m['ratio_dagc_over_ray']:.3f}"
                    if m["ratio_dagc_over_ray"] is not None
                    else "-"
                )
                paired = (
                    f"{m['paired_ratio']:7.3f}" if m["paired_ratio"] is not None else f"{'-':>7}"
                )
                what = f"  {v['title']}: {names[key]}"
                lines.append(f"{'':11} {what[:44]:44} {cols} {ratio:>7} {'':18} {'':4} {paired}")
        for v in c.get("variants", {}).values():
            if v["system"] != "dagc":
                continue
            parts = [
                f"{names[k]} x{m['speedup_vs_dagc']:.2f}"
                for k, m in v["metrics"].items()
                if m["speedup_vs_dagc"] is not None
            ]
            if parts:
                lines.append(
                    f"{'':11}   speed-up of {v['title']} over plain dagc: "
                    + ", ".join(parts)
                    + " (>1 = faster)"
                )
        if c.get("dagc_transports"):
            lines.append(f"{'':11}   dagc channel transports: {', '.join(c['dagc_transports'])}")
        if c.get("checksum_ok") is False:
            lines.append(
                f"{'':11}   WARNING: results differ between systems/variants (checksum; see JSON)"
            )
        for s in SYSTEMS:
            for e in c[s]["errors"][:1]:
                lines.append(f"{'':11} {s} error: {e[:100]}")
        for label, v in c.get("variants", {}).items():
            for e in v["errors"][:1]:
                lines.append(f"{'':11} {label} error: {e[:100]}")
    return "\n".join(lines)


def _median_max(rounds: list[dict], key: str):
    xs = [max(r[key]) for r in rounds if key in r]
    return statistics.median(xs) if xs else None


# -- main -----------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="dagc vs Ray Compiled Graph, side by side (see benchmarks/README.md)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds, fewer samples, smaller scale sweep (< 3 min)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    ap.add_argument(
        "--cases",
        default="all",
        help=f"comma-separated, or 'all' ({','.join(cases_mod.CASES)}; with "
        f"--cluster: {','.join(cases_mod.CLUSTER_CASES)})",
    )
    ap.add_argument("--rounds", type=int, help="rounds per system and case (at least 3)")
    ap.add_argument("--no-scale", action="store_true", help="skip the compile-pipeline sweep")
    ap.add_argument(
        "--scale-only", action="store_true", help="only the compile-pipeline sweep (no Ray)"
    )
    ap.add_argument("--scale-sizes", help="actor counts of the sweep, e.g. 10,100,1000")
    ap.add_argument(
        "--scale-budget", type=float, help="skip a sweep size extrapolated to take longer (s)"
    )
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="the cross-node cases, in a local 3-node Ray cluster this process "
        "starts and stops (no scale sweep)",
    )
    a = ap.parse_args(argv)
    if a.rounds is not None and a.rounds < 3:
        ap.error("--rounds must be at least 3")
    if a.cluster and a.scale_only:
        ap.error("--cluster and --scale-only exclude each other")
    if a.cluster and os.environ.get("RAY_ADDRESS"):
        ap.error("--cluster starts its own cluster; unset RAY_ADDRESS")
    return a


def select_cases(spec: str, registry: dict | None = None):
    registry = cases_mod.CASES if registry is None else registry
    if spec == "all":
        return list(registry.values())
    out = []
    for name in spec.split(","):
        name = name.strip()
        if name not in registry:
            other = (
                " (a --cluster case)"
                if name in cases_mod.CLUSTER_CASES
                else " (not a --cluster case)"
                if name in cases_mod.CASES
                else ""
            )
            raise SystemExit(f"unknown case {name!r}{other}; cases: {', '.join(registry)}")
        out.append(registry[name])
    return out


def configure_ray() -> None:
    # Ray CG gives up on a get() after 10 s by default; on a loaded 2-core machine its
    # 8-actor chain can stall that long, which would lose the round rather than measure it
    from ray.dag.context import DAGContext

    DAGContext.get_current().get_timeout = RAY_GET_TIMEOUT_S
    # the case module's actor classes travel by value: workers need not import benchmarks/
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(cases_mod)


def start_ray():
    import ray

    if ray.is_initialized():
        return
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)
    else:
        # address="local": always a fresh local Ray. Without it ray.init() joins the
        # cluster the machine's /tmp/ray/ray_current_cluster names (another process's
        # running Cluster, say) and then refuses num_cpus.
        ray.init(address="local", num_cpus=max(32, os.cpu_count() or 1), **kw)
    configure_ray()


class LocalCluster:
    """head + node1 {"node1": 1} + node2 {"node2": 1} on this machine, 1 CPU each (actors
    take num_cpus=0 and a node's custom resource, which pins them); the driver joins it.
    ``stop()`` shuts everything down and restores /tmp/ray/ray_current_cluster, which
    ``Cluster`` points at itself."""

    def __init__(self, log):
        self.log = log
        self.cluster = None
        self.address_file = None
        self.address_before = None

    def start(self):
        import ray
        from ray._private.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        self.address_file = get_ray_address_file(None)
        if os.path.exists(self.address_file):
            with open(self.address_file) as f:
                self.address_before = f.read()
        t0 = time.monotonic()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False},
        )
        for name in cases_mod.CLUSTER_NODES:
            self.cluster.add_node(num_cpus=1, resources={name: 1})
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, logging_level="ERROR")
        configure_ray()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        self.log(
            f"cluster up in {time.monotonic() - t0:.1f} s: {len(nodes)} nodes at "
            f"{self.cluster.address}"
        )
        return self

    def stop(self):
        import ray

        t0 = time.monotonic()
        try:
            ray.shutdown()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.shutdown()
            finally:
                try:
                    if self.address_before is None:
                        if self.address_file and os.path.exists(self.address_file):
                            os.unlink(self.address_file)
                    else:
                        with open(self.address_file, "w") as f:
                            f.write(self.address_before)
                except OSError:
                    pass
        self.log(f"cluster shut down in {time.monotonic() - t0:.1f} s")


def check_placement(pools: dict, log) -> dict:
    """Where each cross-node actor runs: node1 and node2, neither the driver's node."""
    import ray

    driver = ray.get_runtime_context().get_node_id()
    out = {"driver": driver, "actors": {}}
    for pool, (actors, _) in pools.items():
        nodes = [cases_mod.node_of(x) for x in actors]
        out["actors"][pool] = nodes
        if len(set(nodes[:2])) != 2 or driver in nodes:
            log(f"WARNING: pool {pool} is not spread over two non-driver nodes: {nodes}")
    log(
        f"placement: driver on {driver[:8]}, actors on "
        + ", ".join(n[:8] for ns in out["actors"].values() for n in ns)
    )
    return out


def run_cases(selected: list, cfg: dict, report: dict, log) -> None:
    import ray

    import dagc

    pools: dict[str, tuple[list, list[int]]] = {}
    for c in selected:
        have = pools.get(c.pool, ([], []))[0]
        if len(have) < c.actors:
            actors = have + cases_mod.POOLS[c.pool](c.actors - len(have))
            pids = ray.get([x.pid.remote() for x in actors])
            pools[c.pool] = (actors, pids)
    log("actors ready: " + ", ".join(f"{k}: {len(v[0])}" for k, v in pools.items()))
    if report["meta"]["mode"].startswith("cluster"):
        report["meta"]["placement"] = check_placement(pools, log)
    if "echo" in pools:
        report["meta"]["first_compile_s"] = first_compiles(pools["echo"][0], log)
    for c in selected:
        actors, pids = pools[c.pool]
        log(f"case {c.name}: {c.title}")
        res = run_case(c, actors[: c.actors], pids[: c.actors], cfg, log)
        report["cases"].append(res)
    report["meta"]["loadavg_end"] = os.getloadavg()
    print()
    print(
        f"dagc {dagc.__version__} vs Ray Compiled Graph {ray.__version__}, "
        f"{os.cpu_count()} CPUs, {report['meta']['mode']} run, {cfg['rounds']} rounds "
        f"each, medians over rounds; load avg {report['meta']['loadavg_start'][0]:.2f}"
        f" -> {report['meta']['loadavg_end'][0]:.2f}"
    )
    print(table(report["cases"]))
    fc = report["meta"].get("first_compile_s")
    if fc:
        print(
            f"first (cold) compile, 1-actor echo: Ray CG {fc['ray']:.3f} s, dagc {fc['dagc']:.3f} s"
        )
        if "ray_first_result" in fc:
            print(
                f"  compile to first result: Ray CG {fc['ray_first_result']:.3f} s, "
                f"dagc {fc['dagc_first_result']:.3f} s"
            )
    all_rounds = [
        r
        for c in report["cases"]
        for rs in [c[s]["rounds"] for s in SYSTEMS]
        + [v["rounds"] for v in c.get("variants", {}).values()]
        for r in rs
    ]
    print(
        "same actors for both systems; every round started with idle actors"
        if all(r.get("started_idle", True) for r in all_rounds)
        else "WARNING: some rounds started while actors were busy (see JSON round_start_cpu)"
    )
    print(
        "ratio = median dagc / median Ray CG (judged against the target); paired = "
        "median over rounds of dagc / Ray CG of adjacent rounds"
    )
    for c in report["cases"]:
        if c.get("note"):
            print(f"{c['name']}: {c['note']}")
    met = [c["name"] for c in report["cases"] if c["met"]]
    missed = [c["name"] for c in report["cases"] if c["met"] is False]
    unknown = [c["name"] for c in report["cases"] if c["met"] is None]
    print(
        f"targets met: {len(met)}/{len(report['cases'])}"
        + (f"; missed: {', '.join(missed)}" if missed else "")
        + (f"; no result (errors): {', '.join(unknown)}" if unknown else "")
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.rounds:
        cfg["rounds"] = a.rounds
    if a.scale_sizes:
        cfg["scale_sizes"] = tuple(int(x) for x in a.scale_sizes.split(","))
    if a.scale_budget:
        cfg["scale_budget_s"] = a.scale_budget
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    import ray

    import dagc

    mode = ("cluster-" if a.cluster else "") + ("quick" if a.quick else "full")
    report: dict = {
        "meta": {
            "mode": mode,
            "config": cfg,
            "ray": ray.__version__,
            "dagc": dagc.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "actors": "one shared pool, the same actors for both systems, alternating rounds "
            "(ray, dagc, ray, dagc, ...); a round starts once the actors are idle",
        },
        "cases": [],
        "scale": None,
    }

    if a.cluster:
        selected = select_cases(a.cases, cases_mod.CLUSTER_CASES)
        report["meta"]["cluster"] = (
            "head + node1 + node2 (ray.cluster_utils.Cluster, 1 CPU "
            "each); actors pinned on node1 / node2; driver on head"
        )
        cluster = LocalCluster(log)
        try:
            cluster.start()
            run_cases(selected, cfg, report, log)
        finally:
            cluster.stop()
    elif not a.scale_only:
        selected = select_cases(a.cases)
        start_ray()
        run_cases(selected, cfg, report, log)

    if not a.no_scale and not a.cluster:
        log(
            "compile-pipeline scale sweep (no Ray): sizes "
            + ",".join(map(str, cfg["scale_sizes"]))
            + " actors x 10 ops"
        )
        res = scale.run(cfg["scale_sizes"], budget_s=cfg["scale_budget_s"])
        report["scale"] = res
        print(scale.table(res))
        slow = scale.slow_stages(res)
        if slow:
            names = sorted({st for _, _, st in slow})
            print(
                f"growing faster than n log n: {', '.join(names)} "
                f"(profile: python benchmarks/scale.py --profile)"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        log(f"wrote {a.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

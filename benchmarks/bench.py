"""dagc vs Ray Compiled Graph, side by side, on the same DAGs and the same actors.

    python benchmarks/bench.py [--quick] [--json out.json] [--cases echo1,chain2,...]
                               [--rounds N] [--no-scale | --scale-only]

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

import psutil  # noqa: E402

from benchmarks import cases as cases_mod  # noqa: E402
from benchmarks import scale  # noqa: E402

SYSTEMS = ("ray", "dagc")
RAY_GET_TIMEOUT_S = 60.0

QUICK = {
    "rounds": 3, "warmup": 200, "latency_n": 1000, "latency_n_big": 300,
    "throughput_n": 2000, "idle_check_s": 0.3, "idle_threshold": 5.0, "idle_wait_max_s": 10.0,
    "idle_delay_s": 1.0, "idle_sample_s": 2.0, "after_teardown_s": 1.0,
    "scale_sizes": (10, 100, 1000), "scale_budget_s": 10.0,
}
FULL = {
    **QUICK, "rounds": 5, "warmup": 500, "latency_n": 5000, "latency_n_big": 1000,
    "throughput_n": 10000, "idle_check_s": 0.5,
    "scale_sizes": (10, 100, 300, 1000), "scale_budget_s": 60.0,
}


# -- the two systems ------------------------------------------------------------------------
def _ray_get(ref):
    import ray
    return ray.get(ref)   # a CompiledDAGRef, or the list of them a MultiOutputNode gives


def _dagc_get(ref):
    return ref.get()


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
def run_round(case, system: str, actors: list, pids: list[int], cfg: dict) -> dict:
    pre = wait_idle(pids, cfg)
    res: dict = {"round_start_cpu": pre["cpu"], "started_idle": pre["idle"],
                 "loadavg": os.getloadavg()[0]}
    idle_case = case.metric.startswith("idle_cpu")
    if idle_case:   # the actors' own CPU with no compiled DAG, sampled as long as the idle one
        res["baseline_cpu"] = cpu_percent(pids, cfg["idle_sample_s"])
    dag = case.build(actors)
    gc.collect()
    t0 = time.perf_counter()
    cg = compile_with(system, dag, case.options.get(system, {}))
    res["compile_s"] = time.perf_counter() - t0
    try:
        res.update(case.measure(cg, GETTERS[system], cfg))
        if "last_execution" in res:   # the idle-CPU case: sample while the DAG is alive
            last = res.pop("last_execution")
            time.sleep(max(0.0, last + cfg["idle_delay_s"] - time.monotonic()))
            idle = cpu_percent(pids, cfg["idle_sample_s"])
            res["idle_cpu_per_actor"] = idle
            res["idle_cpu"] = max(idle)
            res["idle_cpu_above_baseline"] = max(
                i - b for i, b in zip(idle, res["baseline_cpu"]))
    finally:
        t0 = time.perf_counter()
        cg.teardown()
        res["teardown_s"] = time.perf_counter() - t0
    if idle_case:
        time.sleep(0.5)
        res["after_teardown_cpu"] = max(cpu_percent(pids, cfg["after_teardown_s"]))
    return res


def summarize(case, rounds: dict[str, list[dict]]) -> dict:
    out = {"name": case.name, "title": case.title, "metric": case.metric, "unit": case.unit,
           "better": case.better, "target": case.target, "target_text": case.target_text(),
           "absolute": case.absolute, "actors": case.actors, "note": case.note}
    for system in SYSTEMS:
        ok = [r for r in rounds[system] if "error" not in r]
        med = {}
        if ok:
            for k, v in ok[0].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    med[k] = statistics.median(r[k] for r in ok if k in r)
        out[system] = {"median": med, "rounds": rounds[system],
                       "errors": [r["error"] for r in rounds[system] if "error" in r]}
    rv = out["ray"]["median"].get(case.metric)
    dv = out["dagc"]["median"].get(case.metric)
    out["ray_value"], out["dagc_value"] = rv, dv
    out["ratio"] = case.ratio(rv, dv)
    # the same ratio per round (ray round r vs the dagc round right after it), whose median
    # is steadier than the ratio of medians when the machine's load drifts
    pairs = [case.ratio(r.get(case.metric), d.get(case.metric))
             for r, d in zip(rounds["ray"], rounds["dagc"])]
    pairs = [p for p in pairs if p is not None]
    out["paired_ratio"] = statistics.median(pairs) if pairs and not case.absolute else None
    out["met"] = case.met(rv, dv)
    return out


def run_case(case, actors: list, pids: list[int], cfg: dict, log) -> dict:
    rounds: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for r in range(cfg["rounds"]):
        for system in SYSTEMS:
            try:
                res = run_round(case, system, actors, pids, cfg)
            except Exception as e:  # one failed round must not lose the others
                res = {"error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)}
            res["round"] = r
            rounds[system].append(res)
            v = res.get(case.metric)
            log(f"  {case.name:10} round {r} {system:4}: "
                + (fmt(v, case.unit) if v is not None else res.get("error", "?"))
                + ("" if res.get("started_idle", True) else "  (actors were busy at start)"))
    return summarize(case, rounds)


def first_compiles(actors: list, log) -> dict:
    """Compile a 1-actor echo once per system before any case: the cold compile time."""
    out = {}
    for system in SYSTEMS:
        dag = cases_mod.echo1(actors)
        t0 = time.perf_counter()
        cg = compile_with(system, dag, {})
        out[system] = time.perf_counter() - t0
        try:
            GETTERS[system](cg.execute(1))
        finally:
            cg.teardown()
        log(f"  first compile ({system}, 1-actor echo, cold): {out[system]:.3f} s")
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
    head = (f"{'case':11} {'what':44} {'Ray CG':>13} {'dagc':>13} {'ratio':>7} "
            f"{'target':>18} {'met':>4} {'paired':>7}")
    lines = [head, "-" * len(head)]
    for c in results:
        met = {True: "yes", False: "NO", None: "?"}[c["met"]]
        ratio = f"{c['ratio']:.3f}" if c["ratio"] is not None else "-"
        lines.append(f"{c['name']:11} {c['title'][:44]:44} {fmt(c['ray_value'], c['unit']):>13} "
                     f"{fmt(c['dagc_value'], c['unit']):>13} {ratio:>7} "
                     f"{c['target_text']:>18} {met:>4} "
                     + (f"{c['paired_ratio']:7.3f}" if c.get("paired_ratio") is not None
                        else f"{'-':>7}"))
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
        for s in SYSTEMS:
            for e in c[s]["errors"][:1]:
                lines.append(f"{'':11} {s} error: {e[:100]}")
    return "\n".join(lines)


def _median_max(rounds: list[dict], key: str):
    xs = [max(r[key]) for r in rounds if key in r]
    return statistics.median(xs) if xs else None


# -- main -----------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="dagc vs Ray Compiled Graph, side by side (see benchmarks/README.md)")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, fewer samples, smaller scale sweep (< 3 min)")
    ap.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    ap.add_argument("--cases", default="all",
                    help=f"comma-separated, or 'all' ({','.join(cases_mod.CASES)})")
    ap.add_argument("--rounds", type=int, help="rounds per system and case (at least 3)")
    ap.add_argument("--no-scale", action="store_true", help="skip the compile-pipeline sweep")
    ap.add_argument("--scale-only", action="store_true",
                    help="only the compile-pipeline sweep (no Ray)")
    ap.add_argument("--scale-sizes", help="actor counts of the sweep, e.g. 10,100,1000")
    ap.add_argument("--scale-budget", type=float,
                    help="skip a sweep size extrapolated to take longer (s)")
    a = ap.parse_args(argv)
    if a.rounds is not None and a.rounds < 3:
        ap.error("--rounds must be at least 3")
    return a


def select_cases(spec: str):
    if spec == "all":
        return list(cases_mod.CASES.values())
    out = []
    for name in spec.split(","):
        name = name.strip()
        if name not in cases_mod.CASES:
            raise SystemExit(f"unknown case {name!r}; cases: {', '.join(cases_mod.CASES)}")
        out.append(cases_mod.CASES[name])
    return out


def start_ray():
    import ray
    if ray.is_initialized():
        return
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)
    else:
        ray.init(num_cpus=max(32, os.cpu_count() or 1), **kw)
    # Ray CG gives up on a get() after 10 s by default; on a loaded 2-core machine its
    # 8-actor chain can stall that long, which would lose the round rather than measure it
    from ray.dag.context import DAGContext
    DAGContext.get_current().get_timeout = RAY_GET_TIMEOUT_S
    # the case module's actor classes travel by value: workers need not import benchmarks/
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(cases_mod)


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
    report: dict = {"meta": {
        "mode": "quick" if a.quick else "full", "config": cfg, "ray": ray.__version__,
        "dagc": dagc.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "actors": "one shared pool, the same actors for both systems, alternating rounds "
                  "(ray, dagc, ray, dagc, ...); a round starts once the actors are idle",
    }, "cases": [], "scale": None}

    if not a.scale_only:
        selected = select_cases(a.cases)
        start_ray()
        pools: dict[str, tuple[list, list[int]]] = {}
        for c in selected:
            have = pools.get(c.pool, ([], []))[0]
            if len(have) < c.actors:
                actors = have + cases_mod.POOLS[c.pool](c.actors - len(have))
                pids = ray.get([x.pid.remote() for x in actors])
                pools[c.pool] = (actors, pids)
        log(f"actors ready: " + ", ".join(f"{k}: {len(v[0])}" for k, v in pools.items()))
        if "echo" in pools:
            report["meta"]["first_compile_s"] = first_compiles(pools["echo"][0], log)
        for c in selected:
            actors, pids = pools[c.pool]
            log(f"case {c.name}: {c.title}")
            res = run_case(c, actors[:c.actors], pids[:c.actors], cfg, log)
            report["cases"].append(res)
        report["meta"]["loadavg_end"] = os.getloadavg()
        print()
        print(f"dagc {dagc.__version__} vs Ray Compiled Graph {ray.__version__}, "
              f"{os.cpu_count()} CPUs, {report['meta']['mode']} run, {cfg['rounds']} rounds "
              f"each, medians over rounds; load avg {report['meta']['loadavg_start'][0]:.2f}"
              f" -> {report['meta']['loadavg_end'][0]:.2f}")
        print(table(report["cases"]))
        fc = report["meta"].get("first_compile_s")
        if fc:
            print(f"first (cold) compile, 1-actor echo: Ray CG {fc['ray']:.3f} s, "
                  f"dagc {fc['dagc']:.3f} s")
        print("same actors for both systems; every round started with idle actors"
              if all(r.get("started_idle", True) for c in report["cases"] for s in SYSTEMS
                     for r in c[s]["rounds"])
              else "WARNING: some rounds started while actors were busy (see JSON "
                   "round_start_cpu)")
        print("ratio = median dagc / median Ray CG (judged against the target); paired = "
              "median over rounds of dagc / Ray CG of adjacent rounds")
        met = [c for c in report["cases"] if c["met"]]
        print(f"targets met: {len(met)}/{len(report['cases'])}"
              + (f"; missed: {', '.join(c['name'] for c in report['cases'] if c['met'] is False)}"
                 if len(met) < len(report["cases"]) else ""))

    if not a.no_scale:
        log("compile-pipeline scale sweep (no Ray): sizes "
            + ",".join(map(str, cfg["scale_sizes"])) + " actors x 10 ops")
        res = scale.run(cfg["scale_sizes"], budget_s=cfg["scale_budget_s"])
        report["scale"] = res
        print(scale.table(res))
        slow = scale.slow_stages(res)
        if slow:
            names = sorted({st for _, _, st in slow})
            print(f"growing faster than n log n: {', '.join(names)} "
                  f"(profile: python benchmarks/scale.py --profile)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        log(f"wrote {a.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

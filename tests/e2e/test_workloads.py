"""The workload examples (examples/pp_inference.py, tensor_parallel.py, hetero_training.py,
serving.py, pipeline_training.py) run small, each checked against its single-process
reference; dagc.pipeline's generated schedules; execute() from many threads at once.

Timings are the benchmark's business (benchmarks/workloads.py); nothing here asserts one.
"""

import re
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import ray
import torch

import dagc
from dagc.pipelining import bubble_fraction, microbatch_args, stage_orders, theoretical_bubble

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
T = 60  # seconds: any get() here that takes longer is a hang


def load(name: str):
    """examples/<name>.py as ``dagc compile`` loads a pipeline file: its classes and
    functions travel to the actors by value (dagc.cli.load_file)."""
    from dagc.cli import load_file

    key = f"dagc_test_example_{name}"
    if key not in sys.modules:
        load_file(str(EXAMPLES / f"{name}.py"), key)
    return sys.modules[key]


MAKERS = {  # example -> how to start its actors (small configurations)
    "pp_inference": lambda m: m.make_stages(2),
    "tensor_parallel": lambda m: m.make_shards(2),
    "hetero_training": lambda m: m.make_actors(),
    "serving": lambda m: m.make_actors(),
    "pipeline_training": lambda m: m.make_stages(2, 4),
}


@pytest.fixture(scope="module")
def started(ray_session):
    """Every example's actors, started at once: most of their start-up is importing torch,
    which the processes do side by side instead of one example after the other."""
    from concurrent.futures import ThreadPoolExecutor

    mods = {name: load(name) for name in MAKERS}
    with ThreadPoolExecutor(len(MAKERS)) as pool:
        futs = {name: pool.submit(make, mods[name]) for name, make in MAKERS.items()}
        actors = {}
        errors = []
        for name, f in futs.items():
            try:
                actors[name] = f.result(timeout=120)
            except Exception as e:  # noqa: BLE001 - kill what did start, then raise
                errors.append(e)
    try:
        if errors:
            raise errors[0]
        yield {name: (mods[name], actors[name]) for name in MAKERS}
    finally:
        for acts in actors.values():
            for a in acts:
                ray.kill(a)


# -- dagc.pipeline without Ray ---------------------------------------------------------------
def test_stage_orders_1f1b_and_gpipe():
    assert stage_orders(2, 4, "1f1b") == [
        ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"],
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"],
    ]
    assert stage_orders(3, 2, "1f1b")[0] == ["F0", "F1", "B0", "B1"]  # warm-up capped at M
    assert stage_orders(2, 3, "gpipe") == [["F0", "F1", "F2", "B0", "B1", "B2"]] * 2
    for p, m in ((1, 1), (3, 5), (4, 8)):
        for sched in ("gpipe", "1f1b"):
            for order in stage_orders(p, m, sched):  # every call once, B in mb order
                assert sorted(order) == sorted(
                    [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]
                )
                assert [o for o in order if o[0] == "B"] == [f"B{i}" for i in range(m)]
    with pytest.raises(ValueError, match="schedule"):
        stage_orders(2, 2, "interleaved")
    assert theoretical_bubble(4, 8) == pytest.approx(3 / 11)


def test_bubble_fraction_and_microbatch_args():
    # two stages, one microbatch, F and B of 1 unit: each stage busy 2 of 3 units
    spans = [(0, 0, 0, 1), (0, 1, 1, 2), (0, 1, 2, 3), (0, 0, 3, 4)]
    assert bubble_fraction(spans, 2)["bubble"] == pytest.approx(0.5)
    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    args = microbatch_args(x, y, 2)
    assert len(args) == 4 and torch.equal(args[0], x[:2]) and torch.equal(args[3], y[2:])
    with pytest.raises(ValueError, match="multiple of 3"):
        microbatch_args(x, y, 3)


# -- the examples, each against its single-process reference ----------------------------------
@pytest.mark.timeout(120)
def test_pp_inference_matches_reference(started):
    pp, stages = started["pp_inference"]
    with dagc.compile(pp.build_dag(stages)) as cg:
        refs = [cg.execute(pp.batch(i)) for i in range(4)]  # 4 batches in flight
        for i, ref in enumerate(refs):
            torch.testing.assert_close(
                ref.get(timeout=T), pp.reference(pp.batch(i), 2), rtol=1e-4, atol=1e-4
            )


@pytest.mark.timeout(120)
def test_tensor_parallel_matches_unsharded(started):
    tp, shards = started["tensor_parallel"]
    with dagc.compile(tp.build_dag(shards)) as cg:
        for i in range(2):
            outs = cg.execute(tp.batch(i)).get(timeout=T)
            assert len(outs) == 2
            for out in outs:
                torch.testing.assert_close(out, tp.reference(tp.batch(i)), rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(120)
def test_hetero_training_losses_match_single_process(started):
    ht, actors = started["hetero_training"]
    with dagc.compile(ht.build_dag(actors)) as cg:
        got = [cg.execute(*ht.batch(k)).get(timeout=T) for k in range(4)]
    for (loss, norm), (want_loss, want_norm) in zip(got, ht.reference(4)):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert norm == pytest.approx(want_norm, rel=1e-4)


@pytest.mark.timeout(120)
def test_serving_execute_from_many_threads(started):
    """Several threads call execute()/get() at once: each gets its own request's answer."""
    sv, actors = started["serving"]
    with dagc.compile(sv.build_dag(actors), get_timeout=T) as cg:
        wrong, errors = [], []

        def client(c):
            try:
                for k in range(15):
                    req = sv.request(c * 1000 + k)
                    ans = cg.execute(req).get(timeout=T)
                    if not sv.same_answer(ans, sv.reference(req)):
                        wrong.append((req, ans))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        assert not errors, errors[0]
        assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[0]}"
        # and submitted from several threads before any is fetched
        refs, lock = {}, threading.Lock()

        def submit(i):
            ref = cg.execute(sv.request(i))
            with lock:
                refs[i] = ref

        ts = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(T)
        for i, ref in refs.items():
            assert ref.get(timeout=T)["id"] == i
        assert len(refs) == 6


# -- pipeline training with generated schedules -----------------------------------------------
def _column_calls(table: str, label: str) -> list[str]:
    """The forward/backward/step calls in ``label``'s column of the schedule table, by step."""
    lines = table.split("\n\n")[0].splitlines()
    head = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", head)]
    i = [head[s:].split()[0] for s in starts].index(label)
    lo, hi = starts[i], (starts[i + 1] if i + 1 < len(starts) else None)
    out = []
    for row in lines[2:]:
        out += re.findall(r"\b(forward|backward|step) t\d+", row[lo:hi])
    return out


@pytest.fixture
def pipe_stages(started):
    return started["pipeline_training"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pipeline_training_schedule_and_losses(pipe_stages, schedule):
    pt, stages = pipe_stages
    ray.get([s.reset.remote() for s in stages], timeout=T)
    ray.get([s.call_order.remote() for s in stages], timeout=T)
    orders = stage_orders(2, 4, schedule)
    with dagc.compile(dagc.pipeline(stages, microbatches=4, schedule=schedule)) as cg:
        table = str(cg.schedule)
        for s, order in enumerate(orders):  # the table shows the schedule's pattern
            want = [{"F": "forward", "B": "backward"}[o[0]] for o in order] + ["step"]
            assert _column_calls(table, f"a{s}:Stage") == want, table
        got = [cg.execute(*microbatch_args(*pt.batch(k), 4)).get(timeout=T) for k in range(3)]
    assert [ray.get(s.call_order.remote(), timeout=T) for s in stages] == [o * 3 for o in orders]
    for k, (res, (losses, norms)) in enumerate(zip(got, pt.reference(3, 2, 4))):
        assert len(res) == 4 + 2
        assert res[:4] == pytest.approx(losses, rel=1e-5), f"step {k} losses"
        assert res[4:] == pytest.approx(norms, rel=1e-4), f"step {k} grad norms"


def test_pipeline_rejects_bad_arguments(pipe_stages):
    _, stages = pipe_stages
    with pytest.raises(ValueError, match="schedule"):
        dagc.pipeline(stages, microbatches=2, schedule="zero-bubble")
    with pytest.raises(ValueError, match="different actor"):
        dagc.pipeline([stages[0], stages[0]], microbatches=2)
    with pytest.raises(ValueError, match="microbatch"):
        dagc.pipeline(stages, microbatches=0)

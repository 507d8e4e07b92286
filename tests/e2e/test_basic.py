"""End-to-end: compile real Ray DAGs and run them (one shared Ray session)."""

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import ray

import dagc
from dagc import InputNode, MultiOutputNode
from tests.e2e.actors import CustomError


def test_chain(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    with dagc.compile(dag) as cg:
        for i in range(50):
            assert cg.execute(i).get(timeout=10) == i + 2
        assert isinstance(cg.schedule, dagc.Schedule)
        text = str(cg.schedule)
        assert "inc t0" in text and "send t1>driver" in text
        src = cg.source(a)
        assert "DO NOT EDIT" in src and "m_inc" in src
        assert cg.source("a1") == cg.source(b)


def test_single_actor_echo_types(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.echo.bind(inp)
    with dagc.compile(dag) as cg:
        for v in [
            None,
            0,
            -5,
            2**70,
            1.5,
            "s" * 100,
            b"bytes",
            [1, [2, 3]],
            {"k": (1, 2)},
            np.float32(3.0),
            {1, 2},
        ]:
            assert cg.execute(v).get(timeout=10) == v


def test_fan_out_fan_in_multi_output(workers):
    a, b, c, d = workers
    with InputNode() as inp:
        x = a.inc.bind(inp)
        y = b.scale.bind(x, factor=2)
        z = c.scale.bind(x, factor=3)
        s = d.add.bind(y, z)
        dag = MultiOutputNode([s, y, z, x])
    with dagc.compile(dag) as cg:
        for i in range(20):
            assert cg.execute(i).get(timeout=10) == [5 * (i + 1), 2 * (i + 1), 3 * (i + 1), i + 1]


def test_multi_args_kwargs_constants_and_input_attributes(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x = a.scale.bind(inp[0], factor=inp["f"], offset=10)
        y = b.add.bind(inp[1], y=x)
        dag = MultiOutputNode([x, y])
    with dagc.compile(dag) as cg:
        assert cg.execute(2, 5, f=3).get(timeout=10) == [16, 21]
        assert cg.execute(1, 1, f=0).get(timeout=10) == [10, 11]
        with pytest.raises(ValueError, match="positional"):
            cg.execute(1, f=2)
        with pytest.raises(dagc.ExecuteArgumentError):
            cg.execute(1, 2)
        assert cg.execute(0, 0, f=1).get(timeout=10) == [10, 10]


@dataclasses.dataclass
class Settings:
    layers: list
    name: str = "s"


class Holder:
    __slots__ = ("array", "table")

    def __init__(self, array, table):
        self.array, self.table = array, table


def test_constant_objects_compile_and_arrive(workers):
    """Dataclasses, slotted objects, arrays and nested containers bound as constants."""
    a = workers[0]
    settings = Settings([1, {"deep": [2, 3]}])
    holder = Holder(np.arange(5.0), {"k": [(1, 2), {"x"}]})
    with InputNode() as inp:
        dag = a.concat.bind(inp, settings, holder, {"n": [np.ones(2)]})
    with dagc.compile(dag) as cg:
        x, s, h, d = cg.execute(7).get(timeout=10)
        assert x == 7 and s == settings
        assert np.array_equal(h.array, holder.array) and h.table == holder.table
        assert np.array_equal(d["n"][0], np.ones(2))


def test_same_node_read_twice_and_by_driver(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x = a.inc.bind(inp)
        y = b.add.bind(x, x)  # read twice by one method
        dag = MultiOutputNode([x, y, x])  # listed twice in the output
    with dagc.compile(dag) as cg:
        assert cg.execute(1).get(timeout=10) == [2, 4, 2]


def test_nodes_without_input_run_once_per_execution(workers):
    a, b = workers[:2]
    with InputNode() as inp:  # the InputNode is never read
        dag = b.inc.bind(a.pid.bind())
    with dagc.compile(dag) as cg:
        pid = ray.get(a.pid.remote())
        assert [cg.execute().get(timeout=10) for _ in range(3)] == [pid + 1] * 3
        with pytest.raises(dagc.DagcError, match="takes 0 positional"):
            cg.execute(1)
    calls = ray.get(a.num_calls.remote())
    with InputNode() as inp:  # one branch reads it, one only a constant
        dag = MultiOutputNode([a.inc.bind(41), b.echo.bind(inp)])
    with dagc.compile(dag) as cg:
        assert cg.execute("x").get(timeout=10) == [42, "x"]
        assert cg.execute("y").get(timeout=10) == [42, "y"]
    assert ray.get(a.num_calls.remote()) == calls + 2


def test_revisited_actor_a_b_a(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x = a.inc.bind(inp)
        y = b.scale.bind(x, factor=10)
        z = a.add.bind(y, x)  # back on a, using a local value and b's result
        dag = b.inc.bind(z)
    with dagc.compile(dag) as cg:
        sched = cg.schedule
        assert [str(x) for x in sched.of("a0")].count("send t0>a1") == 1
        for i in range(10):
            assert cg.execute(i).get(timeout=10) == (i + 1) * 10 + (i + 1) + 1


def test_num_returns(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x, y = a.pair.options(num_returns=2).bind(inp)
        dag = MultiOutputNode([b.add.bind(x, y), y])
    with dagc.compile(dag) as cg:
        assert cg.execute(3).get(timeout=10) == [9, 6]


def test_num_returns_mismatch_is_task_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x, y, z = a.triple_wrong.options(num_returns=3).bind(inp)
        dag = MultiOutputNode([x, b.add.bind(y, z)])
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match="num_returns=3"):
            cg.execute(1).get(timeout=10)


def test_pipelined_executions_fetched_out_of_order(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    with dagc.compile(dag, max_inflight=6) as cg:
        for _ in range(5):
            refs = [cg.execute(i) for i in range(6)]
            order = [3, 0, 5, 1, 4, 2]
            assert [refs[i].get(timeout=10) for i in order] == [i + 2 for i in order]
            assert refs[3].get() == 5  # get again: same value
        assert dagc.get([cg.execute(i) for i in range(4)], timeout=10) == [2, 3, 4, 5]


def test_exception_becomes_task_error_and_dag_recovers(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.inc.bind(a.fail_if.bind(inp))
    with dagc.compile(dag) as cg:
        assert cg.execute(1).get(timeout=10) == 2
        ref = cg.execute(3)
        with pytest.raises(ValueError) as ei:
            ref.get(timeout=10)
        e = ei.value
        assert isinstance(e, dagc.TaskError) and isinstance(e, ValueError)
        assert isinstance(e.cause, ValueError) and "bad input 3" in str(e)
        assert "fail_if" in str(e) and "Traceback" in str(e)
        with pytest.raises(ValueError):
            ref.get()  # the same error again
        assert cg.execute(4).get(timeout=10) == 5


def test_custom_exception_class_and_fan_out_branch(workers):
    a, b, c = workers[:3]
    with InputNode() as inp:
        dag = MultiOutputNode([a.raise_custom.bind(inp), b.inc.bind(inp)])
    with dagc.compile(dag) as cg:
        with pytest.raises(CustomError) as ei:
            cg.execute(1).get(timeout=10)
        assert ei.value.cause.code == 7
        with pytest.raises(dagc.TaskError):
            cg.execute(2).get(timeout=10)


def test_payload_larger_than_buffer_grows(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.echo.bind(a.inc.bind(inp))
    with dagc.compile(dag, buffer_size=4096, max_inflight=2) as cg:
        for n in [10, 5000, 100, 300_000, 7, 1_000_000]:
            x = np.arange(n, dtype=np.float64)
            y = cg.execute(x).get(timeout=30)
            np.testing.assert_array_equal(y, x + 1)
            # read-only, as Ray CG's are (docs/contract.md, "Big values"); a copy is the caller's
            assert not y.flags.writeable and np.array(y).flags.writeable
        big = [cg.execute(np.ones(200_000)) for _ in range(2)]
        assert [float(r.get(timeout=30).sum()) for r in big] == [400_000.0] * 2


def test_results_are_independent_of_channel_slots(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.array.bind(inp)
    with dagc.compile(dag, max_inflight=2) as cg:
        first = cg.execute(1000).get(timeout=10)
        kept = first.copy()
        for _ in range(10):
            cg.execute(1000).get(timeout=10)
        np.testing.assert_array_equal(first, kept)


def test_capacity_error(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    with dagc.compile(dag, max_inflight=3) as cg:
        refs = [cg.execute(i) for i in range(3)]
        with pytest.raises(dagc.CapacityError):
            cg.execute(9)
        assert refs[0].get(timeout=10) == 1
        r = cg.execute(4)
        assert [x.get(timeout=10) for x in refs[1:]] + [r.get(timeout=10)] == [2, 3, 5]


def test_dropped_refs_free_their_place(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    with dagc.compile(dag, max_inflight=2) as cg:
        for i in range(10):
            cg.execute(i)  # dropped at once
        assert cg.execute(41).get(timeout=10) == 42


def test_timeout_then_fetch_later(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.sleep.bind(inp)
    with dagc.compile(dag) as cg:
        ref = cg.execute(0.5)
        t0 = time.monotonic()
        with pytest.raises(dagc.DagTimeoutError):
            ref.get(timeout=0.05)
        assert time.monotonic() - t0 < 0.4
        with pytest.raises(TimeoutError):
            ref.get(timeout=0.01)
        assert ref.get(timeout=10) == 0.5


def test_get_timeout_option(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.sleep.bind(inp)
    with dagc.compile(dag, get_timeout=0.05) as cg:
        ref = cg.execute(0.3)
        with pytest.raises(dagc.DagTimeoutError):
            ref.get()
        assert ref.get(timeout=5) == 0.3


def test_teardown_idempotent_and_closed_error(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    cg = dagc.compile(dag)
    assert cg.execute(1).get(timeout=10) == 2
    pending = cg.execute(5)
    cg.teardown()
    cg.teardown()
    with pytest.raises(dagc.DagClosedError):
        cg.execute(1)
    with pytest.raises(dagc.DagClosedError):
        pending.get(timeout=5)
    # the actor answers ordinary calls and can be compiled again
    assert ray.get(a.inc.remote(1), timeout=10) == 2
    with dagc.compile(dag) as cg2:
        assert cg2.execute(2).get(timeout=10) == 3


def test_actor_stays_usable_for_remote_calls_while_compiled(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    with dagc.compile(dag) as cg:
        before = ray.get(a.num_calls.remote(), timeout=10)
        assert cg.execute(1).get(timeout=10) == 2
        assert ray.get(a.num_calls.remote(), timeout=10) == before + 1
        assert ray.get(a.echo.remote("x"), timeout=10) == "x"


def test_actor_in_two_dags_runs_both(workers):
    """Several compiled DAGs per actor (tests/e2e/test_multi_dag.py has the rest)."""
    a = workers[0]
    with InputNode() as inp:
        dag = a.inc.bind(inp)
    with dagc.compile(dag) as cg:
        with InputNode() as inp:
            dag2 = a.echo.bind(inp)
        with dagc.compile(dag2) as cg2:
            assert (cg.execute(1).get(timeout=10), cg2.execute(1).get(timeout=10)) == (2, 1)
        assert cg.execute(1).get(timeout=10) == 2


def test_execute_async(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    with dagc.compile(dag) as cg:

        async def main():
            one = await cg.execute_async(1)
            many = await asyncio.gather(*[cg.execute_async(i) for i in range(5)])
            return one, many

        one, many = asyncio.run(asyncio.wait_for(main(), 30))
        assert one == 3 and many == [2, 3, 4, 5, 6]


def test_async_actor_method(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.async_inc.bind(inp)
    with dagc.compile(dag) as cg:
        assert cg.execute(1).get(timeout=10) == 2


def test_torch_tensors_travel_out_of_band(workers):
    torch = pytest.importorskip("torch")
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.echo.bind(a.echo.bind(inp))
    with dagc.compile(dag, buffer_size=1024) as cg:
        t = torch.arange(100_000, dtype=torch.float32).reshape(100, 1000)
        out = cg.execute({"w": t, "n": 3}).get(timeout=10)
        assert torch.equal(out["w"], t) and out["n"] == 3
        g = torch.ones(3, requires_grad=True)
        assert cg.execute(g).get(timeout=10).requires_grad


def test_unpicklable_result_is_task_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.echo.bind(a.unpicklable.bind(inp))
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match="pickle") as e:
            cg.execute(1).get(timeout=10)
        # named as any task error is: the method that returned the value, where it is
        # written, and its schedule step (not "a0.<send> (schedule step -1)")
        msg = str(e.value)
        assert "a0:Worker.unpicklable returned a lock" in msg, msg
        assert "raised by a0.unpicklable at " in msg and "actors.py:" in msg, msg
        assert "Worker.unpicklable (schedule step 2)" in msg, msg
        assert "<send>" not in msg and "step -1" not in msg, msg
        with InputNode() as inp:
            pass


def test_wait_modes(workers):
    a, b = workers[:2]
    for mode in ("spin", "block", "adaptive"):
        with InputNode() as inp:
            dag = b.inc.bind(a.inc.bind(inp))
        with dagc.compile(dag, wait=mode) as cg:
            assert [cg.execute(i).get(timeout=10) for i in range(20)] == list(range(2, 22))


def test_bad_options():
    with pytest.raises(ValueError):
        dagc.api.check_options({"max_inflight": 0})
    with pytest.raises(ValueError):
        dagc.api.check_options({"wait": "nap"})
    with pytest.raises(TypeError, match="unknown option"):
        dagc.api.check_options({"max_in_flight": 3})


def test_error_shows_generated_lines_with_marker(workers):
    a = workers[0]
    with InputNode() as inp:
        dag = a.fail_if.bind(inp)
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError) as ei:
            cg.execute(3).get(timeout=10)
        msg = str(ei.value)
        assert "in generated code <dagc a0:Worker" in msg
        assert "m_fail_if(inp)   <--- HERE" in msg
        assert ei.value.actor == "a0" and ei.value.method == "fail_if"


def test_threads_getting_one_ref_all_get_its_value(workers):
    """Several threads get() the same pending ref (ThreadPoolExecutor().map(ray.get, refs)):
    every one gets the value, none "was never submitted or already fetched"."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = workers[:2]
    with InputNode() as inp:
        dag = MultiOutputNode([a.sleep.bind(inp, 0.3), b.inc.bind(inp)])
    with dagc.compile(dag) as cg, ThreadPoolExecutor(6) as pool:
        for i in range(3):
            ref = cg.execute(i)
            got = list(pool.map(lambda r: r.get(timeout=30), [ref] * 6))
            assert got == [[i, i + 1]] * 6
            assert list(pool.map(ray.get, [ref] * 3)) == [[i, i + 1]] * 3
        bad = cg.execute("x")  # "x" + 1: a TypeError for every thread
        errs = list(pool.map(lambda r: _error_of(r.get, 30), [bad] * 6))
        assert all(isinstance(e, dagc.TaskError) and "TypeError" in str(e) for e in errs), errs


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


def test_failed_ref_raises_a_fresh_error_on_each_get(workers):
    """A failed ref's get() raises a new exception each time: the traceback does not grow
    with every call, and no earlier call's frames are kept alive."""
    import traceback

    a = workers[0]
    with InputNode() as inp:
        dag = a.fail_if.bind(inp)
    with dagc.compile(dag) as cg:
        ref = cg.execute(3)
        errs = [_error_of(ref.get, 10) for _ in range(3)] + [_error_of(ray.get, ref)]
        assert all(isinstance(e, dagc.TaskError) and "bad input 3" in str(e) for e in errs)
        assert len({id(e) for e in errs}) == len(errs)
        depth = [len(traceback.extract_tb(e.__traceback__)) for e in errs[:3]]
        assert depth[0] == depth[1] == depth[2], depth
        assert cg.execute(4).get(timeout=10) == 4


def test_object_ref_arguments_are_resolved(workers):
    """A top-level ObjectRef passed to execute() arrives as its value, as with .remote();
    one whose value cannot be had is a clear error and nothing is submitted."""
    a, b = workers[:2]
    with InputNode() as inp:
        one = b.inc.bind(a.inc.bind(inp))
    with dagc.compile(one) as cg:
        assert cg.execute(ray.put(5)).get(timeout=10) == 7
        assert cg.execute(a.inc.remote(1)).get(timeout=10) == 4
        with pytest.raises(
            dagc.ExecuteArgumentError, match="(?s)argument 0 could not.*bad input 3"
        ):
            cg.execute(b.fail_if.remote(3))
        assert cg.execute(1).get(timeout=10) == 3  # nothing was sent for it
    with InputNode() as inp:
        several = a.add.bind(inp[0], y=inp.y)
    with dagc.compile(several) as cg:
        assert cg.execute(ray.put(2), y=3).get(timeout=10) == 5
        assert cg.execute(2, y=ray.put(4)).get(timeout=10) == 6
        assert cg.execute(ray.put(3), y=ray.put(4)).get(timeout=10) == 7

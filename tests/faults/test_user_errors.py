"""User errors reach the right place as a clear error, and the DAG stays usable.

tests/e2e/test_basic.py already covers: an exception in a chain and in one output of a
MultiOutputNode, a custom exception class, an unpicklable value between actors, a
num_returns mismatch with too many values, and a missing / extra execute() argument on
a multi-field input. These extend that to fan-out/fan-in joins under pipelining, the
driver's own channels, and to checking the DAG keeps working after each error.
"""

import threading

import pytest

import dagc
from dagc import InputNode, MultiOutputNode
from tests.faults.actors import BadUnpickle


@pytest.mark.timeout(120)
def test_fan_out_branch_error_pipelined(ray, nodes):
    """One branch of a fan-out raises for some executions; the join skips its call, the
    error reaches exactly those get()s, and every other execution is unaffected."""
    a, b, c = nodes(3)
    with InputNode() as inp:
        x = a.step.bind(inp)
        y = b.step.bind(x)
        z = c.step.bind(x)
        dag = MultiOutputNode([a.join.bind(y, z), z])
    with dagc.compile(dag, max_inflight=8) as cg:
        joins_before = ray.get(a.num_joins.remote(), timeout=30)
        for _ in range(3):
            inputs = [("raise", 1, i) if i % 3 == 1 else i for i in range(8)]
            refs = [cg.execute(v) for v in inputs]
            for i in [7, 0, 4, 1, 6, 2, 5, 3]:  # fetched out of order
                if i % 3 == 1:
                    with pytest.raises(dagc.TaskError) as ei:
                        refs[i].get(timeout=30)
                    e = ei.value
                    assert isinstance(e, ValueError) and isinstance(e.cause, ValueError)
                    assert e.actor == "a1" and e.method == "step"
                    assert f"node 1 refuses {i}" in str(e) and "Traceback" in str(e)
                else:
                    assert refs[i].get(timeout=30) == [[i, i], i]
        # the join on a ran only for the good executions (a Failure skips the call)
        joins = ray.get(a.num_joins.remote(), timeout=30) - joins_before
        assert joins == 3 * (8 - 3)


@pytest.mark.timeout(120)
def test_unpicklable_exception_still_reported(ray, nodes):
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match="fails holding a lock") as ei:
            cg.execute(("raise-unpicklable", 0, None)).get(timeout=30)
        assert "LockedError" in str(ei.value)
        assert cg.execute(3).get(timeout=30) == 3


@pytest.mark.timeout(120)
def test_unpicklable_output_to_driver(ray, nodes):
    """The value the driver reads cannot be pickled: TaskError naming the actor."""
    a, b = nodes(2)
    with InputNode() as inp:
        dag = MultiOutputNode([a.step.bind(inp), b.step.bind(inp)])
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match="pickle") as ei:
            cg.execute(("unpicklable", 1, None)).get(timeout=30)
        assert "a1:Node" in str(ei.value) and "Unpicklable" in str(ei.value)
        assert cg.execute(2).get(timeout=30) == [2, 2]


@pytest.mark.timeout(120)
def test_unpicklable_input_fails_in_execute(ray, nodes):
    """execute() with an argument that cannot be pickled raises there, consumes nothing."""
    (a,) = nodes(1)
    with InputNode() as inp:
        dag = a.step.bind(inp)
    with dagc.compile(dag, max_inflight=2) as cg:
        for _ in range(5):
            with pytest.raises(TypeError, match="pickle"):
                cg.execute(threading.Lock())
        assert [r.get(timeout=30) for r in [cg.execute(1), cg.execute(2)]] == [1, 2]


class _ReduceFails:
    """Its pickling raises AttributeError: an error of the user's argument all the same."""

    def __reduce__(self):
        raise AttributeError("_ReduceFails has no state to pickle")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("error", ["TypeError", "AttributeError"])
def test_only_argument_encoding_blames_the_arguments(ray, nodes, error):
    """execute() says "could not send its arguments" only when pickling the user's
    arguments failed (whatever the exception); a TypeError or AttributeError that dagc's
    own code raises while submitting propagates as it is, with its traceback, marked as
    an internal error. Neither submits anything."""
    (a,) = nodes(1)
    with InputNode() as inp:
        dag = a.step.bind(inp)
    with dagc.compile(dag, max_inflight=2) as cg:
        with pytest.raises(TypeError, match="could not send its arguments") as ei:
            cg.execute(threading.Lock() if error == "TypeError" else _ReduceFails())
        assert error in str(ei.value)
        (w,) = cg._session.writers.values()  # the driver's input channel
        real = w.slot_off
        try:  # a dagc bug after the value was encoded
            if error == "TypeError":
                w.slot_off = None  # 'NoneType' object is not subscriptable
            else:
                del w.slot_off  # no attribute 'slot_off'
            with pytest.raises(
                {"TypeError": TypeError, "AttributeError": AttributeError}[error]
            ) as ei:
                cg.execute(1)
        finally:
            w.slot_off = real
        assert "could not send its arguments" not in str(ei.value)
        assert "slot_off" in str(ei.value) or "subscriptable" in str(ei.value)
        assert any("internal error" in n for n in getattr(ei.value, "__notes__", ()))
        assert ei.traceback[-1].path.name == "ring.py", ei.traceback[-1]
        assert cg._runs.pending == 0
        assert [r.get(timeout=30) for r in [cg.execute(1), cg.execute(2)]] == [1, 2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value, words", [("three", "returned tuple"), ("scalar", "returned int")])
def test_wrong_number_of_returns(ray, nodes, value, words):
    a, b = nodes(2)
    with InputNode() as inp:
        x, y = a.pair.options(num_returns=2).bind(inp)
        dag = MultiOutputNode([b.join.bind(x, y), y])
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match="num_returns=2") as ei:
            cg.execute(value).get(timeout=30)
        assert words in str(ei.value) and ei.value.method == "pair"
        assert cg.execute(4).get(timeout=30) == [[4, 4], 4]


@pytest.mark.timeout(120)
def test_execute_wrong_arguments_single_input(ray, nodes):
    """A DAG reading its InputNode whole takes exactly one positional argument."""
    (a,) = nodes(1)
    with InputNode() as inp:
        dag = a.step.bind(inp)
    with dagc.compile(dag, max_inflight=2) as cg:
        for args, kwargs in [((), {}), ((1, 2), {}), ((1,), {"k": 2}), ((), {"x": 1})]:
            with pytest.raises(dagc.ExecuteArgumentError, match="1 positional") as ei:
                cg.execute(*args, **kwargs)
            assert isinstance(ei.value, ValueError)
        # nothing was submitted by the failed calls: the full capacity is still there
        refs = [cg.execute(1), cg.execute(2)]
        assert [r.get(timeout=30) for r in refs] == [1, 2]


@pytest.mark.timeout(120)
def test_execute_wrong_keywords_multi_field(ray, nodes):
    a, b = nodes(2)
    with InputNode() as inp:
        dag = MultiOutputNode([a.step.bind(inp[0]), b.step.bind(inp["k"])])
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.ExecuteArgumentError, match="keyword argument"):
            cg.execute(1)
        with pytest.raises(dagc.ExecuteArgumentError):
            cg.execute(1, kk=2)
        assert cg.execute(1, k=2).get(timeout=30) == [1, 2]


# A value that pickles but raises when unpickled on the reading side: the reader turns
# the error into a Failure and consumes the message, so the DAG goes on. These run over
# shared memory; tests/multinode/test_cluster.py::test_value_that_fails_to_unpickle_over_tcp
# runs both across nodes, over TCP.
UNPICKLE_ERROR = (
    r"a value sent by a0:Node on channel c1 could not be unpickled .*"
    r"BadUnpickle cannot be loaded"
)


@pytest.mark.timeout(120)
def test_value_that_fails_to_unpickle_on_the_driver(ray, nodes):
    (a,) = nodes(1)
    with InputNode() as inp:
        dag = a.step.bind(inp)
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match=UNPICKLE_ERROR):
            cg.execute(("badunpickle", 0, None)).get(timeout=30)
        assert cg.execute(2).get(timeout=30) == 2


@pytest.mark.timeout(120)
def test_value_that_fails_to_unpickle_in_an_actor(ray, nodes):
    a, b = nodes(2)
    with InputNode() as inp:
        dag = b.step.bind(a.step.bind(inp))
    with dagc.compile(dag) as cg:
        with pytest.raises(dagc.TaskError, match=UNPICKLE_ERROR):
            cg.execute(("badunpickle", 0, None)).get(timeout=30)
        assert cg.execute(2).get(timeout=30) == 2


def test_bad_unpickle_helper_really_fails():
    import pickle

    with pytest.raises(RuntimeError):
        pickle.loads(pickle.dumps(BadUnpickle()))

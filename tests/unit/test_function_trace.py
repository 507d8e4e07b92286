"""Function nodes traced and lowered without Ray running: each ``f.bind()`` is a call on a
function actor of its own, labelled with the function's name, located at the function,
carrying its Ray options as actor options; what cannot run on one is refused."""

import inspect

import pytest
import ray
from ray.dag import InputNode, MultiOutputNode

import dagc
from dagc.frontend.functions import FunctionActor, actor_options, method_name
from dagc.placement import Placement


@ray.remote
def load(x):
    return [x] * 3


@ray.remote(num_cpus=2, num_gpus=0, max_retries=5, resources={"disk": 1})
def clean(rows):
    return [r + 1 for r in rows]


@ray.remote
def total(rows, *more):
    return sum(rows) + sum(sum(m) for m in more)


@ray.remote
def rows_of(x):
    yield x


LINE = inspect.getsourcelines(load._function)[1]


def _etl():
    with InputNode() as inp:
        raw = load.bind(inp)
        cleaned = clean.options(memory=10**8).bind(raw)
        return MultiOutputNode([total.bind(cleaned), total.bind(raw, cleaned)])


def test_each_function_node_is_an_actor_of_its_own_carrying_its_options():
    traced = dagc.trace(_etl())
    assert traced.actor_ids == ("a0", "a1", "a2", "a3")  # total twice: two actors
    assert [a.label for a in traced.ir.actors] == ["a0:load", "a1:clean", "a2:total", "a3:total"]
    assert "t1 = a1.clean(t0)" in traced.as_text()
    spec = traced.side.handles["a1"]
    assert isinstance(spec, FunctionActor) and spec.fn is clean._function
    # the node's options (decorator and .options()): resources pass, retries do not
    assert spec.options == {"num_cpus": 2, "num_gpus": 0, "resources": {"disk": 1}, "memory": 10**8}
    assert spec.task_options["max_retries"] == 5
    assert traced.side.handles["a0"].options == {}  # no num_cpus: Ray's actor default


def test_lowered_schedule_and_modules_show_the_functions_like_actors():
    lowered = dagc.trace(_etl()).lower()
    table = lowered.as_text()
    for label in ("a0:load", "a1:clean", "a2:total", "a3:total"):
        assert label in table
    assert "load t0" in table and "t2 = total(t1)" in table
    src = lowered.source("a0:load")
    where = f"tests/unit/test_function_trace.py:{LINE} load"
    assert f"t0 = load($0)   {where}" in src  # the step's comment
    assert repr(where) in src  # errors name it too
    assert set(lowered.sources()) == {"driver", "a0", "a1", "a2", "a3"}


def test_what_if_placement_treats_function_actors_like_any():
    traced = dagc.trace(_etl())
    lowered = traced.lower(placement=Placement.spread(traced.actor_ids, nodes=2))
    assert "tcp" in {c.transport for c in lowered.ir.channels}
    assert lowered.ir.actor("a1").where("clean").endswith(" clean")


def test_a_function_node_reused_is_one_call():
    with InputNode() as inp:
        raw = load.bind(inp)
        dag = total.bind(raw, raw)
    traced = dagc.trace(dag)
    assert traced.actor_ids == ("a0", "a1")
    assert "t1 = a1.total(t0, t0)" in traced.as_text()


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda inp: total.bind(load.options(num_returns=2).bind(inp)), "num_returns=2"),
        (lambda inp: total.bind(rows_of.bind(inp)), "generator function"),
    ],
)
def test_what_cannot_run_on_an_actor_is_refused_naming_the_function(build, words):
    with InputNode() as inp:
        dag = build(inp)
    with pytest.raises(dagc.CompileError, match=words) as ei:
        dagc.trace(dag)
    assert "function load" in str(ei.value) or "function rows_of" in str(ei.value)


def test_a_function_node_no_output_depends_on_is_a_leaf():
    with InputNode() as inp:
        raw = load.bind(inp)
        clean.bind(raw)  # its result is never used
        dag = total.bind(raw)
    with pytest.raises(dagc.CompileError, match=r"leaf nodes.*function clean"):
        dagc.trace(dag)


def test_method_names_and_option_mapping():
    assert method_name("<lambda>") == "_lambda_"
    assert method_name("__call__") == "fn_call__"
    assert method_name("load") == "load"
    assert actor_options(
        {
            "num_cpus": 1,
            "max_calls": 1,
            "retry_exceptions": True,
            "name": "x",
            "num_returns": 1,
            "scheduling_strategy": "SPREAD",
            "runtime_env": {"env_vars": {}},
        }
    ) == {"num_cpus": 1, "scheduling_strategy": "SPREAD", "runtime_env": {"env_vars": {}}}

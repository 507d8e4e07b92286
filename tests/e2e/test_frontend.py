"""Frontend: Ray DAG -> IR. Needs live actor handles (the shared Ray session), no compile."""

from dataclasses import dataclass

import numpy as np
import pytest
import ray

import dagc
from dagc import InputNode, MultiOutputNode
from dagc.frontend import walk as trace
from tests.e2e.actors import Worker


@ray.remote
def plain_function(x):
    return x


def ops(ir):
    return [str(ir.op(n)) for n in sorted(ir.graph.nodes, key=lambda n: int(n[1:]))]


def test_chain_ids_follow_dataflow(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.inc.bind(a.inc.bind(inp))
    ir, side = trace(dag)
    assert ops(ir) == ["t0 = a0.inc($0)", "t1 = a1.inc(t0)"]
    assert side.handles["a0"] == a and side.handles["a1"] == b
    assert [x.label for x in ir.actors] == ["a0:Worker", "a1:Worker"]
    assert ir.inputs.direct and ir.inputs.num_positional == 1
    ir.verify()


def test_args_kwargs_constants_and_input_attributes(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x = a.scale.bind(inp[1], factor=inp["f"], offset=[1, 2])
        dag = MultiOutputNode([b.add.bind(x, y=inp[0]), x])
    ir, side = trace(dag)
    assert ir.inputs.fields == (0, 1, "f") and ir.inputs.kwargs == ("f",)
    assert ops(ir) == ["t0 = a0.scale($1, factor=$2, offset=#0)", "t1 = a1.add(t0, y=$0)"]
    assert side.constants == [[1, 2]]
    assert ir.output.multi and [str(r) for r in ir.output.refs] == ["t1", "t0"]


def test_shared_node_is_traced_once(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        x = a.inc.bind(inp)
        dag = MultiOutputNode([b.add.bind(x, x), x, x])
    ir, _ = trace(dag)
    assert len(ir.graph) == 2
    assert [str(r) for r in ir.output.refs] == ["t1", "t0", "t0"]


def test_num_returns_nodes(workers):
    a = workers[0]
    with InputNode() as inp:
        x, y = a.pair.options(num_returns=2).bind(inp)
        dag = MultiOutputNode([y, x])
    ir, _ = trace(dag)
    assert ops(ir) == ["t0 = a0.pair($0) -> 2"]
    assert [str(r) for r in ir.output.refs] == ["t0.1", "t0.0"]


def test_bind_order_is_recorded_as_positions_per_actor(workers):
    a, b = workers[:2]

    def build():
        with InputNode() as inp:
            x1 = b.scale.bind(a.inc.bind(inp))  # a binds inc first, b binds scale first
            x2 = a.scale.bind(b.inc.bind(inp))
            return MultiOutputNode([x2, x1])  # numbered from x2: b.inc is t0

    ir, _ = trace(build())
    assert [
        (o.id, o.actor, o.method, o.bind_index)
        for o in sorted(ir.ops(), key=lambda o: int(o.id[1:]))
    ] == [
        ("t0", "a0", "inc", 1),
        ("t1", "a1", "scale", 1),
        ("t2", "a1", "inc", 0),
        ("t3", "a0", "scale", 0),
    ]
    assert "t0 = a0.inc($0) [bind 1]" in str(ir)
    assert str(trace(build())[0]) == str(ir)  # Ray's counters grew; the IR did not change


def test_tensor_transport_is_recorded(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.echo.bind(a.echo.bind(inp).with_tensor_transport("nccl"))
    ir, _ = trace(dag)
    assert ir.op("t0").transport == "nccl" and ir.op("t1").transport is None


def test_collectives_trace_to_one_op_per_actor(workers):
    from ray.experimental.collective import allgather, allreduce, reducescatter
    from ray.experimental.util.types import ReduceOp

    a, b = workers[:2]
    with InputNode() as inp:
        g = allgather.bind([a.echo.bind(inp), b.echo.bind(inp)])
        r = reducescatter.bind(g, op=ReduceOp.AVG)
        s = allreduce.bind([r, [a.echo.bind(inp), b.echo.bind(inp)]], op=ReduceOp.MIN)
        dag = MultiOutputNode([s[0][1], s[1][0]])
    ir, _ = trace(dag)
    colls = sorted((o for o in ir.ops() if o.group), key=lambda o: (o.group, o.actor))
    assert [(o.group, o.actor, o.method, o.num_returns) for o in colls] == [
        ("g0", "a0", "allgather", 1),
        ("g0", "a1", "allgather", 1),
        ("g1", "a0", "reducescatter.avg", 1),
        ("g1", "a1", "reducescatter.avg", 1),
        ("g2", "a0", "allreduce.min", 2),
        ("g2", "a1", "allreduce.min", 2),
    ]
    assert [str(r) for r in ir.output.refs] == [f"{colls[4].id}.1", f"{colls[5].id}.0"]
    ir.verify()


def test_class_node_is_compile_error(ray_session):
    with InputNode() as inp:
        dag = Worker.bind().inc.bind(inp)
    with pytest.raises(dagc.CompileError, match="Actor.remote"):
        trace(dag)


def test_function_node_is_a_call_on_an_actor_of_its_own(workers):
    with InputNode() as inp:
        dag = workers[0].inc.bind(plain_function.bind(inp))
    ir, side = trace(dag)
    assert ops(ir) == ["t0 = a0.plain_function($0)", "t1 = a1.inc(t0)"]


def test_object_ref_argument_is_compile_error(workers):
    ref = ray.put(3)
    with InputNode() as inp:
        dag = workers[0].add.bind(inp, ref)
    with pytest.raises(dagc.CompileError, match="ObjectRef"):
        trace(dag)


def test_nested_dag_node_is_compile_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.concat.bind([a.inc.bind(inp)])
    with pytest.raises(
        dagc.CompileError,
        match=r"Worker.concat argument 0 \[0\]: a DAG node "
        r"\(Worker.inc\) is nested inside a list",
    ):
        trace(dag)


@dataclass
class Cfg:
    layers: list
    name: str = "cfg"


@dataclass
class StageArgs:
    cfg: Cfg


class Plain:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_dag_node_hidden_in_a_dataclass_is_compile_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.echo.bind(StageArgs(Cfg([1, 2, a.inc.bind(inp)])))
    with pytest.raises(dagc.CompileError) as ei:
        trace(dag)
    msg = str(ei.value)
    assert msg.startswith(
        "Worker.echo argument 0 .cfg.layers[2]: a DAG node (Worker.inc) is "
        "nested inside a StageArgs argument"
    )
    assert "Pass the node as its own argument" in msg


def test_dag_node_hidden_in_a_plain_object_is_compile_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.add.bind(inp, Plain(scale=2, source=a.inc.bind(inp)))
    with pytest.raises(
        dagc.CompileError,
        match=r"Worker.add argument 1 .source: a DAG node "
        r"\(Worker.inc\) is nested inside a Plain",
    ):
        trace(dag)


def test_dag_node_in_nested_dict_and_list_keyword_is_compile_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = b.scale.bind(inp, offset={"k": [1, (2, inp[0])]})
    with pytest.raises(
        dagc.CompileError,
        match=r"Worker.scale keyword argument offset=\['k'\]\[1\]\[1\]: a DAG node",
    ):
        trace(dag)


def test_plain_constant_objects_trace_as_constants(workers):
    a = workers[0]
    cfg, obj = StageArgs(Cfg([1, 2, {"deep": [3]}])), Plain(x=np.arange(4), y={"z": (1,)})
    with InputNode() as inp:
        dag = a.concat.bind(inp, cfg, obj)
    ir, side = trace(dag)
    assert ops(ir) == ["t0 = a0.concat($0, #0, #1)"]
    assert side.constants == [cfg, obj]


def test_not_a_dag_is_compile_error():
    with pytest.raises(dagc.CompileError, match="Ray DAG node"):
        trace(42)
    with pytest.raises(dagc.CompileError, match="MultiOutputNode"):
        trace([1])


def test_mixed_direct_and_indexed_input_is_compile_error(workers):
    a, b = workers[:2]
    with InputNode() as inp:
        dag = MultiOutputNode([a.inc.bind(inp), b.inc.bind(inp[0])])
    with pytest.raises(dagc.CompileError, match="directly"):
        trace(dag)

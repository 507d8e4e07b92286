"""Test helpers: dagc IR built by hand (no Ray), and Ray's current-cluster file kept."""

import contextlib
import os

import networkx as nx

from dagc.ir import CALL, COLLECTIVE, IR, ActorSpec, Arg, InputSpec, Op, OutputSpec, Ref
from dagc.options import Options
from dagc.passes import PassContext, run_passes
from dagc.placement import ActorPlace, Placement


def make_ir(ops, outputs, nfields=1, multi=None, gpus=(), transports=None, bind=None):
    """ops: [(op_id, actor, method, [arg refs], {kw: ref}, num_returns?, group?)]

    Each actor's bind order is its ops' op-id order unless ``bind`` ({op_id: position})
    says otherwise for some ops.
    """
    g = nx.DiGraph()
    actors = []
    transports = transports or {}
    bind = dict(bind or {})
    seen: dict[str, int] = {}
    for spec in sorted(ops, key=lambda o: int(o[0][1:])):
        seen[spec[1]] = seen.get(spec[1], -1) + 1
        bind.setdefault(spec[0], seen[spec[1]])
    for spec in ops:
        oid, actor, method, args = spec[:4]
        kwargs = spec[4] if len(spec) > 4 else {}
        nret = spec[5] if len(spec) > 5 else 1
        group = spec[6] if len(spec) > 6 else None
        op = Op(
            id=oid,
            kind=COLLECTIVE if group else CALL,
            actor=actor,
            method="allreduce.sum" if group else method,
            args=tuple(Arg.parse(a) for a in args),
            kwargs=tuple((k, Arg.parse(v)) for k, v in kwargs.items()),
            num_returns=nret,
            transport=transports.get(oid, "nccl" if group else None),
            group=group,
            bind_index=bind[oid],
        )
        g.add_node(oid, op=op)
        for a in op.refs():
            if isinstance(a, Ref):
                g.add_edge(a.op, oid)
        if actor not in [a.id for a in actors]:
            actors.append(ActorSpec(id=actor, cls="Stage", name=actor))
    actors.sort(key=lambda a: int(a.id[1:]))
    fields = tuple(range(nfields))
    ir = IR(
        graph=g,
        actors=tuple(actors),
        inputs=InputSpec(fields=fields, num_positional=nfields, direct=nfields == 1),
        output=OutputSpec(
            refs=tuple(Arg.parse(o) for o in outputs),
            multi=len(outputs) > 1 if multi is None else multi,
        ),
    )
    ir.verify()
    return ir


def compile_ir(ir, overlap=False, gpus=(), methods=None, **options):
    """Every pass on ``ir`` on one node "n0", verifying the IR after each.

    ``gpus``: actor ids that hold a GPU; ``methods``: {actor id: {method: "file.py:1 C.m"}}.
    """
    methods = methods or {}
    placement = Placement(
        driver_node="n0",
        actors={
            a.id: ActorPlace(
                node="n0", gpus=(0,) if a.id in gpus else (), methods=methods.get(a.id, {})
            )
            for a in ir.actors
        },
    )
    opts = Options(overlap_communication=overlap, **options)
    ctx = PassContext(placement=placement, costs=opts.costs)
    return run_passes(ir, opts.passes(), ctx, callback=lambda p, x: x.verify())


def column(sched, actor):
    """An actor's column of the schedule as action strings."""
    return [str(a) for _, a in sched.of(actor)]


@contextlib.contextmanager
def ray_address_file_kept():
    """Put /tmp/ray/ray_current_cluster back as it was: a Ray started inside points it at
    itself, where a later plain ``ray.init()`` elsewhere on the machine would find it."""
    from ray._private.utils import get_ray_address_file

    address_file = get_ray_address_file(None)
    before = open(address_file).read() if os.path.exists(address_file) else None
    try:
        yield
    finally:
        try:
            if before is None:
                os.unlink(address_file)
            else:
                with open(address_file, "w") as f:
                    f.write(before)
        except OSError:
            pass

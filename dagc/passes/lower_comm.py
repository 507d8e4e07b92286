"""lower-comm: IR -> IR whose tensor channels and collectives name a communicator group.

Backend choice, per edge or collective: a user Communicator instance given to
``with_tensor_transport`` wins; else the compile option ``communicator`` when it is "nccl",
"gloo" or an instance; else ("auto") NCCL when every member actor holds a GPU, gloo
otherwise. An instance whose ``p2p`` is False (a Ray "cpu" communicator, adapted) serves
collectives only; point-to-point edges then choose as under "auto". All point-to-point
tensor edges of one backend share one group over every actor they touch (rank = position
in actor order); a collective gets a group over exactly its participants, reusing an equal
one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from dagc.errors import CompileError
from dagc.ir import COLLECTIVE, IR, CommGroup, Op
from dagc.passes.base import Pass, PassContext


def choose_backend(requested: str | None, option, members, has_gpu, where: str) -> str:
    if requested and requested.startswith("custom"):
        return requested
    if option not in (None, "auto"):
        backend = option if isinstance(option, str) else "custom-option"
    else:
        backend = "nccl" if all(has_gpu(m) for m in members) else "gloo"
    if backend == "nccl" and not all(has_gpu(m) for m in members):
        cpu = [m for m in members if not has_gpu(m)]
        raise CompileError(
            f"{where}: communicator 'nccl' needs GPU actors, but "
            f"{', '.join(cpu)} hold no GPU. Give the actors num_gpus=1, or "
            f"compile with communicator='gloo' (or 'auto')."
        )
    if backend not in ("nccl", "gloo", "custom-option") and not backend.startswith("custom"):
        raise CompileError(
            f"{where}: unknown communicator {backend!r}; use 'auto', 'nccl', "
            f"'gloo' or a dagc.Communicator instance."
        )
    return backend


@dataclass(frozen=True)
class LowerComm(Pass):
    """``communicator``: the compile option's name: "auto", "nccl", "gloo", or
    "custom-option" for a Communicator instance (which the runtime holds; the IR names
    only its group). ``p2p``: False for an instance that serves collectives only."""

    name: ClassVar[str] = "lower-comm"
    requires: ClassVar[frozenset[str]] = frozenset({"placed", "channels"})
    ensures: ClassVar[frozenset[str]] = frozenset({"comm-groups"})
    communicator: str
    p2p: bool = True

    def run(self, ir: IR, ctx: PassContext) -> IR:
        option_name = self.communicator
        # a Ray "cpu" communicator (CPUCommunicator) as the default moves no point-to-point
        # tensors (Ray sends those through shared memory): edges choose as under "auto"
        p2p_option = option_name if self.p2p else "auto"
        gpus = {a.id: bool(a.gpu_ids) for a in ir.actors}
        has_gpu = lambda m: gpus.get(m, False)
        order = {a.id: i for i, a in enumerate(ir.actors)}
        groups: list[CommGroup] = []

        def group_for(backend, members) -> str:
            for g in groups:
                if g.backend == backend and g.members == members:
                    return g.id
            groups.append(CommGroup(id=f"k{len(groups)}", backend=backend, members=members))
            return groups[-1].id

        # point-to-point: one group per backend over all actors it touches
        p2p: dict[str, set] = {}
        chosen = {}
        for c in ir.channels:
            if c.transport != "comm":
                continue
            op = ir.op(c.value.op)
            members = (c.writer, *c.readers)
            b = choose_backend(
                op.transport if op.transport not in ("nccl", "auto") else None,
                p2p_option,
                members,
                has_gpu,
                f"{op.actor}.{op.method} ({op.id})",
            )
            chosen[c.id] = b
            p2p.setdefault(b, set()).update(members)
        p2p_ids = {
            b: group_for(b, tuple(sorted(m, key=order.__getitem__))) for b, m in sorted(p2p.items())
        }
        channels = tuple(
            replace(c, communicator=p2p_ids[chosen[c.id]]) if c.id in chosen else c
            for c in ir.channels
        )
        # collectives: a group over exactly the participants, in bind order
        coll: dict[str, list[Op]] = {}
        for op in ir.ops():
            if op.kind == COLLECTIVE:
                assert op.group is not None, op  # the frontend gives each collective its group
                coll.setdefault(op.group, []).append(op)
        collectives = []
        for gid in sorted(coll, key=lambda g: int(g[1:])):
            ops = sorted(coll[gid], key=lambda o: int(o.id[1:]))
            members = tuple(o.actor for o in ops)
            req = ops[0].transport if ops[0].transport not in ("nccl", "auto") else None
            b = choose_backend(
                req, option_name, members, has_gpu, f"collective {gid} ({ops[0].method})"
            )
            collectives.append((gid, group_for(b, members)))
        return ir.replace(
            channels=channels, comm_groups=tuple(groups), collectives=tuple(collectives)
        )

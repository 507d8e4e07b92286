"""The driver's side of Ray Communicator objects found in a DAG: each is checked and wrapped
in a :class:`~dagc.runtime.comm.ray_adapter.RayCommunicator` before lowering."""

from __future__ import annotations

from dagc.runtime.comm.base import Communicator
from dagc.runtime.comm.ray_adapter import RayCommunicator, actor_key, is_ray_communicator


def adopt(ir, side) -> None:
    """Replace every Ray Communicator in ``side.communicators`` (a DAG node's
    ``with_tensor_transport(transport=obj)`` or a collective's ``transport=obj``) with a
    :class:`RayCommunicator`, after checking on the driver that every actor using it is one
    of its actors. Anything neither dagc's nor Ray's is a CompileError naming its users."""
    from dagc.errors import CompileError
    from dagc.ir import COLLECTIVE

    for name, comm in list(side.communicators.items()):
        if isinstance(comm, Communicator):
            continue
        users = [op for op in ir.ops() if op.transport == name]
        named = ", ".join(f"{op.id} = {op.actor}.{op.method}(...)" for op in users)
        if not is_ray_communicator(comm):
            raise CompileError(
                f"{named or 'a node'}: its transport is a {type(comm).__name__}, neither a "
                f"dagc.Communicator nor a Ray Communicator (a subclass of "
                f"ray.experimental.channel.communicator.Communicator). Pass one of those, "
                f"or with_tensor_transport(transport='auto') (or 'nccl')."
            )
        try:
            adapter = RayCommunicator(comm)
        except ValueError as e:
            raise CompileError(f"{named or 'a node'}: {e}") from None
        actors = {op.actor for op in users}
        for op in users:  # readers of a point-to-point edge use it too
            if op.kind != COLLECTIVE:
                actors.update(ir.op(s).actor for s in ir.graph.successors(op.id))
        for aid in sorted(actors):
            h = side.handles.get(aid)
            if h is not None and actor_key(h) not in adapter.actor_keys:
                who = ir.actor(aid).label if aid in {a.id for a in ir.actors} else aid
                raise CompileError(
                    f"{named}: actor {who} uses the {type(comm).__name__} but is not in its "
                    f"group (get_actor_handles()); Ray: 'Actor is not in the "
                    f"{type(comm).__name__} group.' Add the actor to the communicator or "
                    f"move the value another way."
                )
        side.communicators[name] = adapter

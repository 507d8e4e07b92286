"""Calls into the actors, with errors turned into dagc errors; the probe round."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dagc.errors import ActorDiedError, CompileError
from dagc.runtime.actor import lifecycle

if TYPE_CHECKING:
    from ray.actor import ActorHandle


def ray_get(refs: list[Any], timeout: float | None, procs: Sequence[str], what: str) -> Any:
    """ray.get on actor calls dagc made, with errors a user can act on."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise CompileError(
            f"timed out after {timeout} s waiting for the actors to {what}; "
            f"an actor may be busy in a long method, or still waiting for the resources it "
            f"asked for (see `ray status`)."
        ) from None
    except RayActorError as e:
        raise ActorDiedError(f"an actor died while trying to {what}: {e}") from None
    except RayTaskError as e:
        cause = e.cause if hasattr(e, "cause") else None
        if isinstance(cause, CompileError):
            raise CompileError(str(cause)) from None
        raise CompileError(f"failed to {what}: {e}") from None


def probe_actors(
    handles: Mapping[str, ActorHandle], methods: Mapping[str, Sequence[str]], timeout: float
) -> dict[str, lifecycle.Probe]:
    """The probe round: {actor id: lifecycle.Probe} for every actor in ``handles`` (actor id
    -> ActorHandle); ``methods`` names, per actor, the methods whose source location the
    probe reports. An actor may run other compiled DAGs already (``Probe.busy``): the new
    one runs beside them (``actor/loop.py``: the method lock)."""
    ids = list(handles)
    cwd = os.getcwd()
    probes = ray_get(
        [
            handles[a].__ray_call__.remote(lifecycle.probe, "", tuple(methods.get(a, ())), cwd)
            for a in ids
        ],
        timeout,
        ["driver"] + ids,
        what="report where they run",
    )
    return dict(zip(ids, probes))

"""Calls into the actors, with errors turned into dagc errors."""
from __future__ import annotations

from dagc.errors import ActorDiedError, CompileError


def ray_get(refs, timeout, procs, what: str):
    """ray.get on actor calls dagc made, with errors a user can act on."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise CompileError(f"timed out after {timeout} s waiting for the actors to {what}; "
                           f"an actor may be busy in a long method, or still waiting for the resources it "
                           f"asked for (see `ray status`).") from None
    except RayActorError as e:
        raise ActorDiedError(f"an actor died while trying to {what}: {e}") from None
    except RayTaskError as e:
        cause = e.cause if hasattr(e, "cause") else None
        if isinstance(cause, CompileError):
            raise CompileError(str(cause)) from None
        raise CompileError(f"failed to {what}: {e}") from None


"""``dagc.compile``'s keyword options: :class:`Options`, the one place their defaults live,
and checking what a user passed.

The compiler passes take the options they use as typed fields (``AssignChannels(
buffer_size, max_inflight)``); :meth:`Options.passes` builds the pass list from these
values, so no pass holds a default of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagc.passes import Pass

WAIT_MODES = ("spin", "block", "adaptive")


@dataclass(frozen=True)
class Options:
    """Every option of :func:`dagc.compile` with its default (docs/contract.md says what
    each does). ``Options()`` is the defaults; :func:`check_options` checks a user's."""

    max_inflight: int = 8
    # executions past max_inflight that wait in the driver (runtime/driver/queued.py);
    # 0: one more raises CapacityError, as Ray Compiled Graph does
    max_queued: int = 0
    buffer_size: int = 1 << 20
    get_timeout: float | None = None
    wait: str = "adaptive"
    # "auto", "nccl", "gloo", or a Communicator instance (a Ray one is adapted)
    communicator: Any = "auto"
    overlap_communication: bool = False
    output_dir: str | None = None
    start_timeout: float = 120.0
    teardown_timeout: float = 5.0
    # what the scheduler predicts with: None (uniform), a Profile (cg.profile(n)), a
    # dagc.schedule.Costs, a dict {method: cost}
    costs: Any = None
    # None: bind order; "critical-path" (dagc/passes/schedule_ops.py)
    reorder: str | None = None
    # the longest the driver waits on one output of a MultiOutputNode before looking at
    # the others again, for one that failed (fail fast; runtime/driver/gather.py). Ray's
    # RAY_CGRAPH_read_iteration_timeout_s, under dagc.patch_ray()
    _read_slice: float = 0.1

    @classmethod
    def of(cls, options: dict[str, Any]) -> Options:
        """``options`` (checked, or the defaults' names only) as an Options."""
        return cls(**options)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def passes(self) -> tuple[Pass, ...]:
        """The compiler passes of a compile with these options, in order."""
        from dagc.passes import (
            AssignChannels,
            LowerComm,
            OverlapComm,
            PlaceActors,
            ScheduleOps,
            ValidateGraph,
        )

        comm = self.communicator
        passes: list[Pass] = [
            ValidateGraph(),
            PlaceActors(),
            AssignChannels(buffer_size=self.buffer_size, max_inflight=self.max_inflight),
            LowerComm(
                communicator=comm if isinstance(comm, str) else "custom-option",
                p2p=bool(getattr(comm, "p2p", True)),
            ),
            ScheduleOps(reorder=self.reorder or "bind"),
        ]
        if self.overlap_communication:
            passes.append(OverlapComm())
        return tuple(passes)


DEFAULTS: dict[str, Any] = Options().as_dict()  # the same defaults, as a dict


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the defaults; a TypeError for an unknown name, a ValueError for a
    bad value, each naming it."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(
            f"compile() got unknown option(s) {', '.join(unknown)}; "
            f"options are: {', '.join(k for k in DEFAULTS if k[0] != '_')}"
        )
    o = {**DEFAULTS, **options}
    if (
        not isinstance(o["max_inflight"], int)
        or isinstance(o["max_inflight"], bool)
        or o["max_inflight"] < 1
    ):
        raise ValueError(f"max_inflight must be an int >= 1, got {o['max_inflight']!r}")
    mq = o["max_queued"]
    if not isinstance(mq, int) or isinstance(mq, bool) or mq < 0:
        raise ValueError(f"max_queued must be an int >= 0, got {mq!r}")
    if not isinstance(o["buffer_size"], int) or o["buffer_size"] < 64:
        raise ValueError(f"buffer_size must be an int >= 64 bytes, got {o['buffer_size']!r}")
    if o["get_timeout"] is not None and not (o["get_timeout"] > 0):
        raise ValueError(f"get_timeout must be None or > 0, got {o['get_timeout']!r}")
    if o["wait"] not in WAIT_MODES:
        raise ValueError(f"wait must be one of {', '.join(WAIT_MODES)}, got {o['wait']!r}")
    if not isinstance(o["_read_slice"], (int, float)) or not o["_read_slice"] > 0:
        raise ValueError(f"_read_slice must be a number of seconds > 0, got {o['_read_slice']!r}")
    if o["reorder"] not in (None, "bind", "critical-path"):
        raise ValueError(
            f"reorder must be None or 'critical-path' (calls of methods marked "
            f"@dagc.reorderable may then run out of bind order), got "
            f"{o['reorder']!r}"
        )
    if o["costs"] is not None:
        from dagc.schedule.costs import Costs

        Costs.of(o["costs"])  # a ValueError naming what is wrong
    comm = o["communicator"]
    if isinstance(comm, str):
        if comm not in ("auto", "nccl", "gloo"):
            raise ValueError(
                f"communicator must be 'auto', 'nccl', 'gloo' or a "
                f"dagc.Communicator instance, got {comm!r}"
            )
    else:
        from dagc.runtime.comm.ray_adapter import adapt

        try:  # a Ray Communicator is driven through an adapter
            o["communicator"] = adapt(comm)
        except ValueError:
            raise ValueError(
                f"communicator must be 'auto', 'nccl', 'gloo', a "
                f"dagc.Communicator or a Ray Communicator instance, got "
                f"{type(comm).__name__}"
            ) from None
    return o


def passes_for(options: dict[str, Any]) -> tuple[Pass, ...]:
    """The compiler passes of a compile with ``options`` (checked ones: check_options')."""
    return Options.of(options).passes()


__all__ = ["DEFAULTS", "WAIT_MODES", "Options", "check_options", "passes_for"]

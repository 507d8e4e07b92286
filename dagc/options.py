"""``dagc.compile``'s keyword options: their defaults, and checking what a user passed."""
from __future__ import annotations

WAIT_MODES = ("spin", "block", "adaptive")
DEFAULTS = {
    "max_inflight": 8,
    "buffer_size": 1 << 20,
    "get_timeout": None,
    "wait": "adaptive",
    "communicator": "auto",
    "overlap_communication": False,
    "output_dir": None,
    "profile": False,
    "start_timeout": 120.0,
    "teardown_timeout": 5.0,
    "costs": None,            # what the scheduler predicts with: None (uniform), a Profile
                              # (cg.profile(n)), a dagc.schedule.Costs, a dict {method: cost}
    "reorder": None,          # None: bind order; "critical-path" (dagc/passes/schedule_ops.py)
    # the longest the driver waits on one output of a MultiOutputNode before looking at
    # the others again, for one that failed (fail fast; runtime/driver/gather.py). Ray's
    # RAY_CGRAPH_read_iteration_timeout_s, under dagc.patch_ray()
    "_read_slice": 0.1,
}


def check_options(options: dict) -> dict:
    """``options`` over the defaults; a TypeError for an unknown name, a ValueError for a
    bad value, each naming it."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"compile() got unknown option(s) {', '.join(unknown)}; "
                        f"options are: {', '.join(k for k in DEFAULTS if k[0] != '_')}")
    o = {**DEFAULTS, **options}
    if not isinstance(o["max_inflight"], int) or isinstance(o["max_inflight"], bool) \
            or o["max_inflight"] < 1:
        raise ValueError(f"max_inflight must be an int >= 1, got {o['max_inflight']!r}")
    if not isinstance(o["buffer_size"], int) or o["buffer_size"] < 64:
        raise ValueError(f"buffer_size must be an int >= 64 bytes, got {o['buffer_size']!r}")
    if o["get_timeout"] is not None and not (o["get_timeout"] > 0):
        raise ValueError(f"get_timeout must be None or > 0, got {o['get_timeout']!r}")
    if o["wait"] not in WAIT_MODES:
        raise ValueError(f"wait must be one of {', '.join(WAIT_MODES)}, got {o['wait']!r}")
    if not isinstance(o["_read_slice"], (int, float)) or not o["_read_slice"] > 0:
        raise ValueError(f"_read_slice must be a number of seconds > 0, got "
                         f"{o['_read_slice']!r}")
    if o["reorder"] not in (None, "bind", "critical-path"):
        raise ValueError(f"reorder must be None or 'critical-path' (calls of methods marked "
                         f"@dagc.reorderable may then run out of bind order), got "
                         f"{o['reorder']!r}")
    if o["costs"] is not None:
        from dagc.schedule.costs import Costs
        Costs.of(o["costs"])             # a ValueError naming what is wrong
    comm = o["communicator"]
    if isinstance(comm, str):
        if comm not in ("auto", "nccl", "gloo"):
            raise ValueError(f"communicator must be 'auto', 'nccl', 'gloo' or a "
                             f"dagc.Communicator instance, got {comm!r}")
    else:
        from dagc.runtime.comm.base import Communicator
        if not isinstance(comm, Communicator):
            raise ValueError(f"communicator must be 'auto', 'nccl', 'gloo' or a "
                             f"dagc.Communicator instance, got {type(comm).__name__}")
    return o

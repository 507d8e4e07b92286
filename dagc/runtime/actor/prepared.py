"""The prepare round, inside an actor: a node's control and rings made, TCP writers listening.

Only a compile that spans nodes, or has TCP channels, has this round (between the probe
and the start round). What it makes waits here, keyed by compile token, until this
actor's loop adopts it at start (:func:`take`), or ``stop`` cleans it up when the compile
fails before that. An entry whose driver never came back (it died between the rounds)
is discarded by this actor's next probe, prepare or start once it expired (the driver
gives up on a round after start_timeout).
"""

from __future__ import annotations

import os
import time
import traceback

from dagc.runtime.actor.plan import PrepareSpec, tcp_channel_name
from dagc.runtime.channels import Control, create_segment, shm

# compile token -> {"writers": {cid: TcpWriter listening}, "leader": made this node's control
# segment, "expires": monotonic time}
_PREPARED: dict[str, dict] = {}


def prepare(instance, token: str, spec: PrepareSpec) -> dict:
    """Round 1 on a node other than the driver's, or for an actor that writes over TCP.

    A node's leader creates the node's control segment and the shared-memory segments
    written on that node; a TCP writer starts listening. Returns {cid: (host, port)}.
    All or nothing: on failure, whatever it made is closed and removed.
    """
    expire()
    entry = _PREPARED.setdefault(
        token,
        {"writers": {}, "leader": False, "expires": time.monotonic() + 3 * spec.timeout + 10.0},
    )
    try:
        return _prepare(token, spec, entry)
    except BaseException as e:
        discard(token)
        drop_frames(e)
        raise


def _prepare(token: str, spec: PrepareSpec, entry: dict) -> dict:
    from dagc.runtime.channels import tcp

    if spec.ctl:
        entry["leader"] = True
        Control(
            spec.ctl, create=True, nprocs=spec.nprocs, index=spec.index, pid=os.getpid()
        ).release()
    for ring in spec.segments:
        create_segment(ring.segment, ring.nreaders, ring.slots, ring.capacity).close()
    addrs = {}
    for out in spec.tcp:
        w = tcp.TcpWriter(
            tcp_channel_name(token, out.channel),
            out.nreaders,
            out.slots,
            spec.secret,
            None,
            tuple(out.readers),
            reader_names=list(out.reader_names),
            connect_timeout=spec.timeout,
        )
        entry["writers"][out.channel] = w
        addrs[out.channel] = w.listen(spec.host)
    return addrs


def take(token: str) -> dict:
    """The TCP writers prepared for compile ``token`` ({cid: TcpWriter}), now the caller's."""
    entry = _PREPARED.pop(token, None)
    return entry["writers"] if entry is not None else {}


def drop_frames(exc: BaseException) -> None:
    """Let go of the objects a failed start-up's finished frames still reference (a
    half-made reader, the writers being adopted): Ray keeps the raised exception in a
    reference cycle, so its traceback's frames would hold their fds (wake pipes) until some
    later garbage collection. The traceback itself (files, lines) stays intact. The
    caller's own frame, still running, is not cleared: it keeps no end in a local."""
    traceback.clear_frames(exc.__traceback__)


def expire() -> None:
    now = time.monotonic()
    for token in [t for t, e in _PREPARED.items() if e["expires"] < now]:
        discard(token)


def discard(token: str) -> None:
    """A compile that failed after prepare(): close its TCP writers (the listening socket
    and accept thread go with them) and, on a node leader, remove the node's segments."""
    entry = _PREPARED.pop(token, None)
    if entry is None:
        return
    for w in entry["writers"].values():
        try:
            w.close()
        except Exception:
            pass
    if entry["leader"]:
        shm.unlink_prefix(shm.dag_prefix(token))


def tokens() -> list[str]:
    """The compiles with something prepared here (for tests and status)."""
    return sorted(_PREPARED)

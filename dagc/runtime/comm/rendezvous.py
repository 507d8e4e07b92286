"""The rendezvous of dagc's store-based communicators (gloo, the Ray adapter): a
``torch.distributed.TCPStore`` served by rank 0's process.

``prepare()`` runs in rank 0's process before the group forms (``lifecycle.comm_prepare``)
and starts the master store on a free port; ``setup()`` on rank 0 runs later in the same
process, possibly on another copy of the communicator object, so the master is kept here by
(host, port) until rank 0 takes it. Every other rank connects as a client.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from typing import Any

from dagc.runtime.comm.base import node_ip

_MASTERS: dict[tuple[str, int], Any] = {}  # (host, port) -> master TCPStore
_LOCK = threading.Lock()


def open_master(tag: str) -> tuple[Any, dict]:
    """Start a master store (port 0: it binds a free port itself, no pick-then-bind race);
    returns it and the rendezvous the other ranks are given: host, port, a key prefix."""
    from torch.distributed import TCPStore

    host = node_ip()
    master = TCPStore(host, 0, None, True, datetime.timedelta(seconds=300), wait_for_workers=False)
    port = int(master.port)
    with _LOCK:
        _MASTERS[(host, port)] = master
    return master, {"host": host, "port": port, "prefix": f"{tag}-{uuid.uuid4().hex[:16]}/"}


def take_master(rendezvous: dict) -> Any | None:
    """Rank 0: the master store this process started for ``rendezvous``, if it did."""
    with _LOCK:
        return _MASTERS.pop((rendezvous["host"], int(rendezvous["port"])), None)


def connect(rendezvous: dict, timeout: float) -> Any:
    """A client of the rendezvous' store (it retries its connection until ``timeout``)."""
    from torch.distributed import TCPStore

    tmo = datetime.timedelta(seconds=max(0.1, timeout))
    host, port = rendezvous["host"], int(rendezvous["port"])
    return TCPStore(host, port, None, False, tmo, wait_for_workers=False)


def forget(master: Any) -> None:
    """A communicator destroyed before its rank 0 set up: drop its master store."""
    if master is None:
        return
    with _LOCK:
        for k, v in list(_MASTERS.items()):
            if v is master:
                del _MASTERS[k]

"""Channels: how values move between the processes of a compiled DAG.

    shm.py        segments in /dev/shm and futexes: the kernel facilities the rest stands on
    segment.py    a ring segment's and a big-value segment's memory layout, and making them
    ring.py       the shared-memory ring's protocol and its Writer (one writer, many readers)
    ring_reader.py  its Reader: zero-copy leased views, big-value segments
    bigvalue.py   payload layouts both ends share; a process's mapping of a big-value segment
    control.py    the DAG's control segment on each node; Waiter (how every wait waits)
    serialize.py  the pickle encoder both channel kinds use
    sweep.py      removing what DAGs whose processes all died left in /dev/shm
    tcp/          the channel between nodes, with the ring's interface

The names below are what the driver and the actors use.
"""

from dagc.runtime.channels.control import (
    CLOSED,
    FAILED,
    RUNNING,
    SWAP,
    ChannelClosed,
    Control,
    PeerDied,
    Waiter,
    WaitTimeout,
)
from dagc.runtime.channels.ring import Reader, Writer
from dagc.runtime.channels.segment import create_segment

__all__ = [
    "Control",
    "Waiter",
    "Writer",
    "Reader",
    "create_segment",
    "ChannelClosed",
    "PeerDied",
    "WaitTimeout",
    "RUNNING",
    "CLOSED",
    "FAILED",
    "SWAP",
]

"""Channels: how values move between the processes of a compiled DAG.

    shm.py        segments in /dev/shm and futexes: the kernel facilities the rest stands on
    segment.py    one ring segment's memory layout, and making one
    ring.py       the shared-memory ring: Writer, Reader (one writer, many readers)
    control.py    the DAG's control segment on each node; Waiter (how every wait waits)
    serialize.py  the pickle encoder both channel kinds use
    sweep.py      removing what DAGs whose processes all died left in /dev/shm
    tcp/          the channel between nodes, with the ring's interface

The names below are what the driver and the actors use.
"""
from dagc.runtime.channels.control import (CLOSED, FAILED, RUNNING, SWAP, ChannelClosed,
                                           Control, PeerDied, WaitTimeout, Waiter)
from dagc.runtime.channels.ring import Reader, Writer
from dagc.runtime.channels.segment import create_segment

__all__ = ["Control", "Waiter", "Writer", "Reader", "create_segment", "ChannelClosed",
           "PeerDied", "WaitTimeout", "RUNNING", "CLOSED", "FAILED", "SWAP"]

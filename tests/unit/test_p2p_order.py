"""Deferred receives of comm channels (runtime/comm/p2p.py), with a fake communicator and
fake metadata channels: which ops post them first, and forgetting them at a swap. No Ray."""

import pytest

pytest.importorskip("torch")  # skips the module without torch, before the imports below

import torch

from dagc.runtime.comm.base import DONE
from dagc.runtime.comm.p2p import CommReader, CommWriter, drop_pending, pending_of


class WouldBlock(Exception):
    pass


class Meta:
    """A metadata channel end: reading an empty one would block (raises here)."""

    def __init__(self):
        self.queue = []

    def write(self, v):
        self.queue.append(v)
        return False

    def read(self):
        if not self.queue:
            raise WouldBlock("read would block: the metadata is not there")
        return self.queue.pop(0)

    def ready(self):
        return bool(self.queue)


class Comm:
    def __init__(self, per_peer):
        self.per_peer_order = per_peer
        self.log = []

    def send(self, t, peer):
        self.log.append(("send", peer))

    def recv(self, t, peer):
        self.log.append(("recv", peer))
        t.fill_(7)

    def isend(self, t, peer):
        self.log.append(("isend", peer))
        return DONE

    def irecv(self, t, peer):
        self.log.append(("irecv", peer))
        t.fill_(7)
        return DONE


def ends(per_peer):
    comm = Comm(per_peer)
    from_a2, from_a0 = Meta(), Meta()
    r2 = CommReader(from_a2, comm, writer_rank=2)  # this process: a1 (rank 1)
    r0 = CommReader(from_a0, comm, writer_rank=0)
    to_a0 = Meta()
    w = CommWriter(to_a0, comm, {"a0": 0}, ("a0",), "a1")
    return comm, r2, r0, w, from_a2, from_a0


def test_gloo_send_does_not_post_another_peers_deferred_receive():
    """a1 issued a receive from a2 whose metadata is not there; its send to a0 must not
    block for it (gloo pairs per peer: the deadlock proof never made a1's send wait on a2)."""
    comm, r2, r0, w, from_a2, from_a0 = ends(per_peer=True)
    h = r2.irecv()
    assert not h.posted and pending_of(comm, 2) == [h]
    w.send(torch.ones(2), "a0")  # used to raise WouldBlock
    assert comm.log == [("send", 0)]
    from_a0.write((None, (((2,), torch.float32),)))
    assert r0.recv().tolist() == [7.0, 7.0]  # another peer's receive: no wait
    from_a2.write((None, (((3,), torch.float32),)))
    assert h.wait().tolist() == [7.0] * 3
    assert comm.log == [("send", 0), ("recv", 0), ("irecv", 2)]


def test_one_stream_posts_every_deferred_receive_first():
    """NCCL and custom communicators (one stream): any op posts them first, in order."""
    comm, r2, r0, w, from_a2, from_a0 = ends(per_peer=False)
    h = r2.irecv()
    assert not h.posted and pending_of(comm) == [h]  # one queue for every peer
    from_a2.write((None, (((3,), torch.float32),)))
    w.send(torch.ones(2), "a0")
    assert comm.log == [("irecv", 2), ("send", 0)] and h.posted


def test_same_peer_receives_keep_issue_order():
    comm, r2, r0, w, from_a2, from_a0 = ends(per_peer=True)
    h1 = r2.irecv()
    from_a2.write((None, (((1,), torch.float32),)))
    from_a2.write((None, (((2,), torch.float32),)))
    assert r2.recv().shape == (2,)  # h1 was posted first, with the 1st
    assert h1.posted and h1.wait().shape == (1,)


def test_drop_pending_forgets_unposted_receives():
    """A loop parked for a profile's swap (runtime/actor/loop.py) drops the receive it had
    issued for the next execution; the next loop's receive then reads the next metadata."""
    comm, r2, r0, w, from_a2, from_a0 = ends(per_peer=True)
    r2.irecv()
    assert drop_pending(comm) == 1 and pending_of(comm, 2) == []
    h = r2.irecv()
    from_a2.write((None, (((4,), torch.float32),)))
    assert h.wait().shape == (4,)

"""Shared-memory ring channels: one writer, any number of readers, ``nslots`` messages in
flight; values with big buffers are read in place, as read-only views of the slot.

The segment's memory layout and payload kinds are in ``channels/segment.py``; this module
is the protocol and the writing end (``ring_big.py`` its big-value path), ``ring_reader.py``
the reading end, ``bigvalue.py`` the payload layouts both share and a process's mapping of a
big-value segment.

**Slots.** Slots are not tied to message numbers: the writer fills the lowest slot that no
unread message and no live view holds, so a DAG run one execution at a time keeps reusing
slot 0 (or 0 and 1, while the loop still holds the previous value), whose lines are still in
cache, instead of sweeping every slot (for 1 MiB payloads that alone is most of the cost of
a copy), and a slot deeper than the pipeline ever gets is never touched. A ring has
``nphys = nslots + nreaders * budget`` slots (``budget = min(nslots, 16)``): the window,
plus as many views as each reader may hold.

**One copy per hop.** The writer copies each buffer once, into the slot: a plain array's
bytes (the ARRAY kind, no pickle), or pickle protocol 5's out-of-band buffers (numpy arrays
and CPU torch tensors inside any value) after the pickle bytes; nothing passes through an
intermediate ``bytes``. A reader does not copy a payload of ``zero_copy_min`` bytes or more
(64 KiB): the arrays and tensors it returns are views of one read-only root array over the
slot, and the slot stays **leased** — the reader's lease byte for it stays 1 — until the
last view is gone (a weakref callback on the root; every array, tensor and buffer rebuilt
from the message keeps the root alive). Holding a value never blocks anything: the writer
skips leased slots, and a reader that already holds ``budget`` leases copies instead (so
``nslots - 1`` unread messages plus every lease still leave the writer a free slot). Small
payloads are copied (a copy is cheaper than a lease and frees the slot at once). Arrays
are read-only either way, as Ray's are (``np.array(x)`` / ``x.copy()`` to write);
a tensor cannot be read-only, so where a channel has more than one reader, tensors are
copied on read (one reader's in-place op must not show in another's value).

**Big values.** A payload larger than a slot (``buffer_size``) goes to the slot's own
big-value segment (``<ring>.x<gen>``, exactly its size, reserved whole before anything is
written): only the slot that needs it grows, so memory follows what is in flight and held,
not ``nslots`` x the largest value. The same segment is reused while it is big enough; one
not used for ``shrink_after`` messages is unmapped by the writer and by each reader (both
count messages, so they agree without a word: the writer reuses it for message t only if
t - last < shrink_after, a reader drops it once it has read past last + shrink_after), and
its memory goes with the last mapping. A reader checks this only off its fast path (a
wait, or any payload but a small in-band pickle); the writer marks the message after it let
a segment go KIND_SYNC (an in-band pickle all the same), so a reader that never waits
still gets there at once. Every byte written is reserved first
(``shm.reserve``): a full /dev/shm is ``ShmFullError`` for that value, never a SIGBUS.

States of the slot k that message m took (r ranges over readers)::

    writing   write_seq == m, the writer fills k           nobody reads k
    unread    write_seq > m, some read_seq[r] <= m         readers decode it
    leased    every read_seq[r] > m, some lease[r][k] = 1  views of it are alive
    free      every read_seq[r] > m, every lease[r][k] = 0 the writer may reuse k

A reader stores lease[r][k] = 1 before it stores read_seq[r] = m + 1, and the writer loads
every read_seq before the lease bytes, so a slot is never seen free while a view is being
made. The writer waits until fewer than ``nslots`` messages are unread before it publishes
one, so slot_map[m % nslots] is only rewritten once every reader is past m.

**Memory order.** The writer stores the payload, then slot_map, then ``write_seq``; a
reader loads ``write_seq``, then slot_map, then the payload, decodes it, then stores its
``read_seq``; the writer loads every ``read_seq`` (then the lease bytes) before it stores
into a slot again. x86-64 keeps stores in order and loads in order, which is all this
needs. On aarch64 each end issues a full barrier (``shm.fence``) where the order matters:
the writer after loading the read_seqs and before publishing ``write_seq``, a reader after
seeing ``write_seq`` and before storing its ``read_seq`` (and before clearing a lease).
Other machines get no ring at all (``shm.ring_fence``).

Names: a segment's name only has to exist until every process that uses it has mapped it.
The DAG's own start-up removes the names of the rings it creates (see
``Control.mark_opened``); a big-value segment's name is removed by the last of its readers
to map it (under a ``flock`` of the segment, so exactly one reader sees that every reader's
pid is there), and by the writer once every reader is past the first message in it,
whichever comes first. The pids in its header are also how a segment whose every process
died is recognised as stale (``channels.sweep``).

Waiting (``wait`` mode, see :class:`Waiter`): spin briefly, then poll with sched_yield for a
self-tuning budget, then sleep in FUTEX_WAIT with a short timeout; a writer issues
FUTEX_WAKE only when some reader's sleeping flag is set. Every sleep slice also checks the
DAG's control word (teardown, a death noticed elsewhere) and the peer's pid, so no wait
outlives a dead peer by more than a fraction of a second.
"""

from __future__ import annotations

import os
import pickle
import time

import numpy as np

from dagc.runtime.channels import shm
from dagc.runtime.channels.bigvalue import put_oob, release
from dagc.runtime.channels.control import Waiter, WaitTimeout
from dagc.runtime.channels.ring_big import BigWriter
from dagc.runtime.channels.ring_reader import Reader
from dagc.runtime.channels.segment import (
    KIND_ARRAY,
    KIND_PICKLE,
    RESERVE0,
    SLOT_HDR,
    W_NPHYS,
    W_NREADERS,
    W_NSLOTS,
    W_SHRINK,
    W_STRIDE,
    W_WPID,
    W_WSEQ,
    W_WSLEEP,
    W_ZCMIN,
    channel_of,
    create_segment,
    header_size,
    lease_offset,
    map_word,
    round64,
    rseq_word,
    rsleep_word,
)

_ndarray = np.ndarray
_SCALARS = frozenset({int, float, bool, str, bytes, type(None)})
_uint8 = np.uint8
_dumps = pickle.dumps


class Writer(BigWriter):
    """The writing end of a channel. ``write(value)`` never fails for size: a payload
    larger than a slot goes to that slot's big-value segment; only a full /dev/shm fails
    it (``ShmFullError``, through ``on_encode_error`` when one is set)."""

    def __init__(
        self,
        name: str,
        nreaders: int,
        slots: int,
        capacity: int,
        waiter: Waiter,
        reader_procs: tuple = (),
        create: bool = True,
    ):
        self._fence = shm.ring_fence()  # None on x86-64; refuses unknown machines
        self.base = name
        self.channel = channel_of(name)
        self.waiter = waiter
        self.peers = tuple(reader_procs)
        self._bufs: list = []
        self._dispatch = None
        self._shared_reads = nreaders > 1  # tensors are copied by readers (serialize.py)
        if create:
            create_segment(name, nreaders, slots, capacity).close()
        self.mm, self._fd = shm.open_existing(name, keep_fd=True)
        self.mv = memoryview(self.mm)
        self.w = w = self.mv.cast("q")
        w[W_WPID] = os.getpid()
        self.addr = shm.address(self.mm)
        self.nreaders = nreaders = w[W_NREADERS]
        self.slots = slots = w[W_NSLOTS]
        self.nphys = nphys = w[W_NPHYS]
        self.stride = w[W_STRIDE]
        self.capacity = self.stride - SLOT_HDR
        self.shrink_after = w[W_SHRINK]
        self.zc = w[W_ZCMIN]
        hdr = header_size(nreaders, slots)
        self.slot_off = [hdr + k * self.stride for k in range(nphys)]
        # payload bytes each slot can take without reserving more (the first page is
        # reserved when the ring is made; the rest of a slot when a message needs it)
        self._room = [RESERVE0 - SLOT_HDR] * nphys
        self.rseq = [rseq_word(r) for r in range(nreaders)]
        self.rsleep = [rsleep_word(r) for r in range(nreaders)]
        self.map = map_word(nreaders)
        self._lease_at = [lease_offset(nreaders, slots, r) for r in range(nreaders)]
        self._leasable = 0  # slots whose message readers may hold views of
        self._big: dict = {}  # slot -> _Big, its big-value segment
        self._gen = 0
        self._names: list = []  # (big segment name, first message in it) still named
        self._maint = False  # something for _maintain to do after a write
        self._kpickle = KIND_PICKLE  # KIND_SYNC for the message after big segments went
        self.size = len(self.mm)
        self.reserved = hdr + nphys * RESERVE0
        self.stats_big_made = 0

    def write(self, value, deadline: float | None = None) -> bool | None:
        """Publish ``value``. Returns True when it could not be sent (not picklable, or no
        room in /dev/shm) and ``on_encode_error``'s stand-in was published instead."""
        raws = arr = None
        cls = value.__class__
        if cls in _SCALARS:
            # always picklable, never out-of-band buffers: skip the encoder's machinery
            main = _dumps(value, 5)
            need = len(main)
        elif cls is _ndarray and value.dtype.kind not in "OV" and value.flags.c_contiguous:
            # a plain array skips pickle: dtype and shape in a small header, then its bytes
            arr = value
            dt = value.dtype.str.encode()
            hdr = round64(16 + 8 * value.ndim + len(dt))
            need = hdr + value.nbytes
        else:
            try:
                main = self._encode(value)
            except Exception as e:
                # on_encode_error's Failure goes instead; True tells the caller (None else)
                return self._write_instead(e, value, deadline)
            bufs = self._bufs
            if bufs:
                raws = [b.raw() for b in bufs]
                need = (
                    round64(16 + 8 * len(raws))
                    + round64(len(main))
                    + sum(round64(r.nbytes) for r in raws)
                )
            else:
                need = len(main)
        # The slot: the lowest one no unread message and no live view holds. A DAG run one
        # execution at a time keeps reusing slot 0 (still in cache), and a slot deeper than
        # the pipeline ever gets is never touched. Which slots unread messages hold is read
        # back from the slot map each time: no state of ours can drift from what the
        # readers see, even if an interrupt cuts a write short.
        w = self.w
        seq = w[W_WSEQ]  # only this writer stores it
        n = self.slots
        low = seq
        for i in self.rseq:
            r = w[i]
            if r < low:
                low = r
        if seq - low >= n:  # every slot is held: wait for the oldest
            for i in self.rseq:
                if w[i] <= low:
                    self.waiter.wait(w, i, low + 1, self.addr, W_WSLEEP, self.peers, deadline)
            low += 1
        if self._fence is not None:  # read_seqs before lease bytes and slots
            self._fence()
        busy = 0
        m = self.map
        while low < seq:
            busy |= 1 << w[m + low % n]
            low += 1
        if self._leasable:  # views of earlier messages may be alive
            busy = self._leased(busy)
        k = (~busy & (busy + 1)).bit_length() - 1
        if need > self._room[k]:
            return self._write_big(
                value, deadline, seq, k, need, arr, None if arr is not None else main, raws
            )
        off = self.slot_off[k]
        mv = self.mv
        p = off + SLOT_HDR
        if arr is not None:
            hw = p >> 3
            w[hw] = arr.ndim
            w[hw + 1] = len(dt)
            for j, d in enumerate(arr.shape):
                w[hw + 2 + j] = d
            q = p + 16 + 8 * arr.ndim
            mv[q : q + len(dt)] = dt
            if arr.nbytes:
                mv[p + hdr : p + need] = arr.reshape(-1).view(_uint8)
            w[off >> 3] = need
            w[(off >> 3) + 1] = KIND_ARRAY
            if need >= self.zc:
                self._leasable |= 1 << k
        elif raws is None:
            mv[p : p + need] = main
            w[off >> 3] = need
            w[(off >> 3) + 1] = self._kpickle  # KIND_PICKLE, or KIND_SYNC once
        else:
            put_oob(mv, w, p, main, raws)
            w[off >> 3] = -need  # negative length: out-of-band layout
            w[(off >> 3) + 1] = KIND_PICKLE
            bufs.clear()
            if need >= self.zc:
                self._leasable |= 1 << k
        w[m + seq % n] = k
        if self._fence is not None:  # payload and slot map before write_seq
            self._fence()
        w[W_WSEQ] = seq + 1  # publish
        for i in self.rsleep:
            if w[i]:
                shm.futex_wake(self.addr + W_WSEQ * 8)
                break
        if self._maint:
            self._maintain(seq + 1)
        return None  # sent (the same bytecode as falling off the end)

    def _leased(self, busy: int) -> int:
        """``busy`` plus the slots some reader still holds views of (read after every
        read_seq, see the module docstring). A slot stops being watched once no reader
        leases it and none has its message unread."""
        mv = self.mv
        held = 0
        mask = self._leasable
        while mask:
            bit = mask & -mask
            mask ^= bit
            k = bit.bit_length() - 1
            for base in self._lease_at:
                if mv[base + k]:
                    held |= bit
                    break
        self._leasable = held | (self._leasable & busy)
        if (busy | held) + 1 >> self.nphys:
            # cannot happen: every reader copies once it holds its budget of leases
            held = self._wait_for_slot(busy)
        return busy | held

    def _wait_for_slot(self, unread: int) -> int:
        """Defensive: every physical slot is held. Poll until a view goes (the waiter's
        checks end it on teardown or a death); returns the slots leased then."""
        mv = self.mv
        while True:
            self.waiter.check(self.peers, None)
            time.sleep(0.0005)
            held = 0
            for k in range(self.nphys):
                for base in self._lease_at:
                    if mv[base + k]:
                        held |= 1 << k
                        break
            if (unread | held) + 1 >> self.nphys == 0:
                return held

    def stats(self) -> dict:
        """What this channel holds in /dev/shm (the writer knows: it reserves it all)."""
        big = sum(b.size for b in self._big.values())
        return {
            "channel": self.channel,
            "role": "writer",
            "slots": self.slots,
            "physical_slots": self.nphys,
            "slot_bytes": self.capacity,
            "ring_bytes": self.size,
            "big_segments": len(self._big),
            "big_bytes": big,
            "shm_bytes": self.reserved + big,
            "mapped_bytes": self.size + big,
            "big_made": self.stats_big_made,
        }

    def wake_all(self) -> None:
        try:
            shm.futex_wake(self.addr + W_WSEQ * 8)
            for r in range(self.nreaders):
                shm.futex_wake(self.addr + rseq_word(r) * 8)
        except (ValueError, TypeError):
            pass

    def close(self) -> None:
        for b in self._big.values():
            b.close()
        self._big = {}
        # a name some reader has not mapped yet stays: it may still read what was written
        # (its last reader to map it, the DAG's teardown or the stale sweep removes it)
        try:
            low = min(self.w[i] for i in self.rseq)
            for name, first in self._names:
                if low > first:
                    shm.unlink(name)
        except ValueError:
            pass
        self._names = []
        self._maint = False
        release(self.w, self.mv, self.mm)
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


__all__ = ["Reader", "Writer", "WaitTimeout"]

"""Shared-memory ring channels: one writer, any number of readers, ``slots`` messages.

The segment's memory layout and payload kinds are in ``channels/segment.py``.

Slots are not tied to message numbers: the writer fills the lowest slot that no unread
message holds, so a DAG run one execution at a time keeps reusing slot 0, whose lines are
still in cache, instead of sweeping all ``nslots`` slots (for 1 MiB payloads that alone is
most of the cost of a copy), and a slot deeper than the pipeline ever gets is never touched
(tmpfs allocates a page on first write). States of the slot k that message m took::

    filled    write_seq > m, some read_seq <= m          readers copy it out
    released  every read_seq > m                         the writer may reuse it

The writer waits until fewer than ``nslots`` messages are unread before it publishes one,
so slot_map[m % nslots] is only rewritten once every reader is past m.

The writer stores the payload, then slot_map, then ``write_seq``; a reader loads
``write_seq``, then slot_map, then the payload, copies it out, then stores its
``read_seq``. x86-64 keeps stores in order, which
is what this relies on (see docs/architecture.md on other architectures).

Names: a segment's name only has to exist until every process that uses it has mapped it.
The DAG's own start-up removes the names of the segments it creates (see
``Control.mark_opened``); a grown segment's name is removed by the last of its readers to
follow the MOVED record (under a ``flock`` of the segment, so exactly one reader sees
that every reader's pid is there), and by the writer once every reader is past the MOVED
record, whichever comes first. The pids in the header are also how a segment whose every
process died is recognised as stale (``channels.sweep``).

Waiting (``wait`` mode, see :class:`Waiter`): spin briefly, then poll with sched_yield for a
self-tuning budget, then sleep in FUTEX_WAIT with a short timeout; a writer issues
FUTEX_WAKE only when some reader's sleeping flag is set. Every sleep slice also checks the
DAG's control word (teardown, a death noticed elsewhere) and the peer's pid, so no wait
outlives a dead peer by more than a fraction of a second.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from dagc.runtime.channels import shm
from dagc.runtime.channels.control import Waiter
from dagc.runtime.channels.serialize import PickleEncoder
from dagc.runtime.channels.segment import (KIND_ARRAY, KIND_MOVED, KIND_PICKLE, SLOT_HDR,
                                          W_NREADERS, W_NSLOTS, W_STRIDE, W_WPID, W_WSEQ,
                                          W_WSLEEP, create_segment, header_size, map_word,
                                          round64, rpid_word, rseq_word, rsleep_word)

_ndarray = np.ndarray
_SCALARS = frozenset({int, float, bool, str, bytes, type(None)})
_frombuffer = np.frombuffer
_uint8 = np.uint8
_loads = pickle.loads
_dumps = pickle.dumps


class Writer(PickleEncoder):
    """The writing end of a channel. ``write(value)`` never fails for size: it grows."""

    def __init__(self, name: str, nreaders: int, slots: int, capacity: int, waiter: Waiter,
                 reader_procs: tuple = (), create: bool = True):
        self.base = name
        self.gen = 0
        self.waiter = waiter
        self.nreaders = nreaders
        self.slots = slots
        self.peers = tuple(reader_procs)
        self._old: list = []
        self._bufs: list = []
        self._dispatch = None
        self._map(create_segment(name, nreaders, slots, capacity) if create
                  else shm.open_existing(name))

    def _map(self, mm) -> None:
        self.mm = mm
        self.mv = memoryview(mm)
        self.w = self.mv.cast("q")
        self.w[W_WPID] = os.getpid()
        self.addr = shm.address(mm)
        self.stride = self.w[W_STRIDE]
        self.capacity = self.stride - SLOT_HDR
        hdr = header_size(self.nreaders, self.slots)
        self.slot_off = [hdr + k * self.stride for k in range(self.slots)]
        self.rseq = [rseq_word(r) for r in range(self.nreaders)]
        self.rsleep = [rsleep_word(r) for r in range(self.nreaders)]
        self.map = map_word(self.nreaders)

    def write(self, value, deadline: float | None = None) -> bool | None:
        """Publish ``value``. Returns True when it could not be pickled and
        ``on_encode_error``'s stand-in was published instead (None otherwise)."""
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
                need = (round64(16 + 8 * len(raws)) + round64(len(main))
                        + sum(round64(r.nbytes) for r in raws))
            else:
                need = len(main)
        # The slot: the lowest one no unread message holds. A DAG run one execution at a
        # time keeps reusing slot 0 (still in cache), and a slot deeper than the pipeline
        # ever gets is never touched (its pages are never allocated). Which slots unread
        # messages hold is read back from the slot map each time: no state of ours can
        # drift from what the readers see, even if an interrupt cuts a write short.
        w = self.w
        seq = w[W_WSEQ]                          # only this writer stores it
        n = self.slots
        low = seq
        for i in self.rseq:
            r = w[i]
            if r < low:
                low = r
        if seq - low >= n:                       # every slot is held: wait for the oldest
            for i in self.rseq:
                if w[i] <= low:
                    self.waiter.wait(w, i, low + 1, self.addr, W_WSLEEP, self.peers, deadline)
            low += 1
        busy = 0
        m = self.map
        while low < seq:
            busy |= 1 << w[m + low % n]
            low += 1
        k = (~busy & (busy + 1)).bit_length() - 1
        if need > self.capacity:
            self._grow(need, seq, k)             # the new segment starts empty
            w = self.w
            seq += 1
            k = 0
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
            mv[q:q + len(dt)] = dt
            if arr.nbytes:
                mv[p + hdr:p + need] = arr.reshape(-1).view(_uint8)
            w[off >> 3] = need
            w[(off >> 3) + 1] = KIND_ARRAY
        elif raws is None:
            mv[p:p + need] = main
            w[off >> 3] = need
            w[(off >> 3) + 1] = KIND_PICKLE
        else:
            hw = (p >> 3)
            w[hw] = len(raws)
            w[hw + 1] = len(main)
            for j, r in enumerate(raws):
                w[hw + 2 + j] = r.nbytes
            q = p + 16 + 8 * len(raws)
            q = (q + 63) & ~63
            mv[q:q + len(main)] = main
            q = (q + len(main) + 63) & ~63
            for r in raws:
                nb = r.nbytes
                mv[q:q + nb] = r
                q = (q + nb + 63) & ~63
            w[off >> 3] = -need          # negative length: out-of-band layout
            w[(off >> 3) + 1] = KIND_PICKLE
            bufs.clear()
        w[self.map + seq % n] = k
        w[W_WSEQ] = seq + 1      # publish
        for i in self.rsleep:
            if w[i]:
                shm.futex_wake(self.addr + W_WSEQ * 8)
                break
        if self._old:
            self._retire()

    def _grow(self, need: int, seq: int, k: int) -> None:
        """Publish a MOVED record as message ``seq`` (in free slot ``k``) and switch to a
        bigger segment, whose messages start at ``seq + 1``."""
        new_cap = max(need, 2 * self.capacity)
        self.gen += 1
        new_name = f"{self.base}.g{self.gen}"
        mm = create_segment(new_name, self.nreaders, self.slots, new_cap, start_seq=seq + 1)
        rec = _dumps((new_name, seq))
        off = self.slot_off[k]
        self.mv[off + SLOT_HDR:off + SLOT_HDR + len(rec)] = rec
        self.w[off >> 3] = len(rec)
        self.w[(off >> 3) + 1] = KIND_MOVED
        self.w[self.map + seq % self.slots] = k
        self.w[W_WSEQ] = seq + 1
        for i in self.rsleep:
            if self.w[i]:
                shm.futex_wake(self.addr + W_WSEQ * 8)
                break
        self._old.append((self.mm, self.mv, self.w, seq + 1,
                          self.base if self.gen == 1 else f"{self.base}.g{self.gen - 1}",
                          new_name))
        self._map(mm)

    def _retire(self) -> None:
        """Unmap old segments once every reader has followed the MOVED record.

        A reader opens the new segment before it marks the MOVED record read, so by then
        every reader has mapped the new one: its name goes too, if its last reader to
        follow has not removed it already (and the old name, if anything left it)."""
        keep = []
        for entry in self._old:
            mm, mv, w, done, name, new_name = entry
            if all(w[i] >= done for i in self.rseq):
                shm.unlink(name)
                shm.unlink(new_name)
                w.release()
                mv.release()
                mm.close()
            else:
                keep.append(entry)
        self._old = keep

    def wake_all(self) -> None:
        try:
            shm.futex_wake(self.addr + W_WSEQ * 8)
            for r in range(self.nreaders):
                shm.futex_wake(self.addr + rseq_word(r) * 8)
        except (ValueError, TypeError):
            pass

    def close(self) -> None:
        for mm, mv, w, *_ in self._old:
            _release(w, mv, mm)
        self._old = []
        _release(self.w, self.mv, self.mm)


class Reader:
    """The reading end of a channel for reader number ``index``."""

    def __init__(self, name: str, index: int, waiter: Waiter, writer_proc: int = -1):
        shm.tune_malloc()
        self.waiter = waiter
        self.index = index
        self.peers = (writer_proc,) if writer_proc >= 0 else ()
        self.seq = 0
        self._map(shm.open_existing(name))

    def _map(self, mm) -> None:
        self.mm = mm
        self.mv = memoryview(mm)
        self.w = self.mv.cast("q")
        self.w[rpid_word(self.index)] = os.getpid()
        self.addr = shm.address(mm)
        nreaders = self.w[W_NREADERS]
        slots = self.w[W_NSLOTS]
        stride = self.w[W_STRIDE]
        hdr = header_size(nreaders, slots)
        self.slots = slots
        self.slot_off = [hdr + k * stride for k in range(slots)]
        self.map = map_word(nreaders)
        self.my_seq = rseq_word(self.index)
        self.my_sleep = rsleep_word(self.index)

    def ready(self) -> bool:
        return self.w[W_WSEQ] > self.seq

    def wait_ready(self, deadline: float | None = None) -> None:
        """Wait until a message is there, without consuming it."""
        if self.w[W_WSEQ] <= self.seq:
            self.waiter.wait(self.w, W_WSEQ, self.seq + 1, self.addr, self.my_sleep,
                             self.peers, deadline)

    def read(self, deadline: float | None = None):
        seq = self.seq
        w = self.w
        if w[W_WSEQ] <= seq:
            self.waiter.wait(w, W_WSEQ, seq + 1, self.addr, self.my_sleep, self.peers, deadline)
        off = self.slot_off[w[self.map + seq % self.slots]]
        n = w[off >> 3]
        kind = w[(off >> 3) + 1]
        if kind == KIND_MOVED:
            return self._follow(off, n, deadline)
        p = off + SLOT_HDR
        try:
            if kind == KIND_ARRAY:
                hw = p >> 3
                ndim = w[hw]
                dlen = w[hw + 1]
                shape = tuple(w[hw + 2:hw + 2 + ndim])
                q = p + 16 + 8 * ndim
                hdr = round64(16 + 8 * ndim + dlen)
                value = _frombuffer(bytearray(self.mv[p + hdr:p + n]),    # owns its memory
                                    bytes(self.mv[q:q + dlen]).decode()).reshape(shape)
            elif n >= 0:
                value = _loads(self.mv[p:p + n])
            else:
                hw = p >> 3
                nbufs = w[hw]
                mlen = w[hw + 1]
                lens = [w[hw + 2 + j] for j in range(nbufs)]
                q = (p + 16 + 8 * nbufs + 63) & ~63
                blob = bytearray(self.mv[q:p - n])   # one copy: the value owns its memory
                bv = memoryview(blob)
                pos = (mlen + 63) & ~63
                parts = []
                for ln in lens:
                    parts.append(bv[pos:pos + ln])
                    pos = (pos + ln + 63) & ~63
                value = _loads(bv[:mlen], buffers=parts)
        except Exception as e:          # consumed all the same: the DAG goes on
            value = self._undecodable(e)
        self.seq = seq + 1
        w[self.my_seq] = seq + 1
        if w[W_WSLEEP]:
            shm.futex_wake(self.addr + self.my_seq * 8)
        return value

    def _undecodable(self, exc: Exception):
        from dagc.runtime.failure import capture
        procs = self.waiter.procs
        src = self.peers[0] if len(self.peers) == 1 else -1
        who = procs[src] if 0 <= src < len(procs) else "its writer"
        err = TypeError(f"a value sent by {who} could not be unpickled by its reader: "
                        f"{type(exc).__name__}: {exc}. Send values whose classes can be "
                        f"imported (and rebuilt) on every process of the DAG.")
        return capture(err, who, "<unpickle>", -1)

    def _follow(self, off: int, n: int, deadline):
        name, _ = _loads(self.mv[off + SLOT_HDR:off + SLOT_HDR + n])
        seq = self.seq + 1
        index = self.index

        def joined(mm):
            # under the segment's flock: record this reader; the last one removes the name
            w = memoryview(mm).cast("q")
            try:
                w[rpid_word(index)] = os.getpid()
                if all(w[rpid_word(r)] for r in range(w[W_NREADERS])):
                    shm.unlink(name)
            finally:
                w.release()

        # map the new segment before marking the MOVED record read: the writer removes
        # its name once every reader is past that record
        mm = shm.open_existing(name, locked=joined)
        self.w[self.my_seq] = seq
        if self.w[W_WSLEEP]:
            shm.futex_wake(self.addr + self.my_seq * 8)
        old = (self.w, self.mv, self.mm)
        self._map(mm)
        _release(*old)
        self.seq = seq
        return self.read(deadline)

    def wake(self) -> None:
        try:
            shm.futex_wake(self.addr + W_WSEQ * 8)
        except (ValueError, TypeError):
            pass

    def close(self) -> None:
        _release(self.w, self.mv, self.mm)


def _release(w, mv, mm) -> None:
    try:
        w.release()
        mv.release()
        mm.close()
    except (BufferError, ValueError):
        pass

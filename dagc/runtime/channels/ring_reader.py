"""The reading end of a shared-memory ring (see ``ring.py`` for the protocol: slots, leases,
big-value segments, memory order)."""

from __future__ import annotations

import os
import pickle
import weakref

import numpy as np

from dagc.runtime.channels import shm
from dagc.runtime.channels.bigvalue import BigSegment, copy_out, release, round64
from dagc.runtime.channels.control import Waiter
from dagc.runtime.channels.segment import (
    B_NREADERS,
    KIND_ARRAY,
    KIND_BIG,
    KIND_PICKLE,
    KIND_SYNC,
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
    big_header,
    big_name,
    big_rpid_word,
    channel_of,
    header_size,
    lease_budget,
    lease_offset,
    map_word,
    rpid_word,
    rseq_word,
    rsleep_word,
)
from dagc.runtime.channels.serialize import NotDecoded, undecodable

_frombuffer = np.frombuffer
_U8 = np.dtype(np.uint8)
_loads = pickle.loads
_NEVER = 1 << 62


class _Lease(weakref.ref):
    """A weak reference to the root array of one message's views, on slot ``k``."""

    __slots__ = ("k",)
    k: int


class Reader:
    """The reading end of a channel for reader number ``index``."""

    def __init__(self, name: str, index: int, waiter: Waiter, writer_proc: int = -1):
        shm.tune_malloc()
        self._fence = shm.ring_fence()  # None on x86-64; refuses unknown machines
        self.waiter = waiter
        self.index = index
        self.peers = (writer_proc,) if writer_proc >= 0 else ()
        self.writer_proc = writer_proc  # its control index (-1: find it by its pid)
        self.seq = 0
        self.base = name
        self.channel = channel_of(name)
        self._leases: dict = {}  # slot -> _Lease of the views of the message read there
        self._big: dict = {}  # slot -> BigSegment (this reader's mapping)
        self.mm = shm.open_existing(name)
        self.mv = memoryview(self.mm)
        self.ro = self.mv.toreadonly()
        self.w = w = self.mv.cast("q")
        w[rpid_word(index)] = os.getpid()
        self.addr = shm.address(self.mm)
        self.nreaders = nreaders = w[W_NREADERS]
        self.slots = slots = w[W_NSLOTS]
        stride = w[W_STRIDE]
        hdr = header_size(nreaders, slots)
        self.slot_off = [hdr + k * stride for k in range(w[W_NPHYS])]
        self.map = map_word(nreaders)
        self.my_seq = rseq_word(index)
        self.my_sleep = rsleep_word(index)
        self.lease0 = lease_offset(nreaders, slots, index)
        self.budget = lease_budget(slots)
        self.zc = w[W_ZCMIN]
        self.shrink_after = w[W_SHRINK]
        self.size = len(self.mm)
        self._unlease_cb = self._unlease
        self._exp_at = _NEVER  # the first message at which a big segment may expire

    def ready(self) -> bool:
        return self.w[W_WSEQ] > self.seq

    def wait_ready(self, deadline: float | None = None) -> None:
        """Wait until a message is there, without consuming it."""
        if self.w[W_WSEQ] <= self.seq:
            self.waiter.wait(
                self.w, W_WSEQ, self.seq + 1, self.addr, self.my_sleep, self.peers, deadline
            )

    def read(self, deadline: float | None = None):
        seq = self.seq
        w = self.w
        if w[W_WSEQ] <= seq:
            if seq >= self._exp_at:  # idle: drop a big-value segment no longer used
                self._expire(seq)
            self.waiter.wait(w, W_WSEQ, seq + 1, self.addr, self.my_sleep, self.peers, deadline)
        if self._fence is not None:  # write_seq before the slot map and payload
            self._fence()
        k = w[self.map + seq % self.slots]
        off = self.slot_off[k]
        n = w[off >> 3]
        try:
            if n >= 0 and w[(off >> 3) + 1] == 1:  # KIND_PICKLE, in-band: the fast path
                value = _loads(self.mv[off + SLOT_HDR : off + SLOT_HDR + n])
            else:
                value = self._decode(k, off, n, seq)
        except Exception as e:  # consumed all the same: the DAG goes on
            value = self._undecodable(e)
        self.seq = seq + 1
        if self._fence is not None:  # decoding and lease bytes before read_seq
            self._fence()
        w[self.my_seq] = seq + 1  # after any lease byte (see the module docstring)
        if w[W_WSLEEP]:
            shm.futex_wake(self.addr + self.my_seq * 8)
        return value

    def _decode(self, k: int, off: int, n: int, seq: int):
        """Every payload but a small in-band pickle: arrays, out-of-band buffers, big-value
        segments. Views (leased) from ``zero_copy_min`` bytes, copies below."""
        w = self.w
        h = off >> 3
        kind = w[h + 1]
        if seq >= self._exp_at:  # a big-value segment the writer no longer uses
            self._expire(seq)
        if kind == KIND_SYNC:  # an in-band pickle sent to get us here (above)
            kind = KIND_PICKLE
        if kind == KIND_BIG:
            try:
                big = self._open_big(k, w[h + 3], w[h + 4])
            except Exception as e:
                raise NotDecoded(
                    f"its big-value segment {big_name(self.base, w[h + 3])} could not be opened"
                ) from e
            big.last = seq
            if seq + self.shrink_after < self._exp_at:
                self._exp_at = seq + self.shrink_after
            kind = w[h + 2]
            ro, mv, words, p = big.ro, big.mv, big.w, big.hdr
        else:
            ro, mv, words, p = self.ro, self.mv, w, off + SLOT_HDR
        if n >= 0 and kind == KIND_PICKLE:
            return _loads(mv[p : p + n])  # in-band: pickle copies what it keeps
        size = -n if n < 0 else n
        lease = size >= self.zc and len(self._leases) < self.budget
        hw = p >> 3
        if kind == KIND_ARRAY:
            ndim = words[hw]
            dlen = words[hw + 1]
            shape = tuple(words[hw + 2 : hw + 2 + ndim])
            q = p + 16 + 8 * ndim
            dtype = np.dtype(bytes(mv[q : q + dlen]).decode())
            start = p + round64(16 + 8 * ndim + dlen)
            nbytes = p + n - start
            try:
                if lease:
                    root = self._lease(k, ro, start, nbytes, dtype)
                else:
                    root = copy_out(mv, start, nbytes, dtype)
                return root.reshape(shape)
            except Exception as e:  # no pickle here: say what did fail
                raise NotDecoded(f"its array ({dtype}, shape {shape}) could not be rebuilt") from e
        nbufs = words[hw]
        mlen = words[hw + 1]
        lens = [words[hw + 2 + j] for j in range(nbufs)]
        q = (p + 16 + 8 * nbufs + 63) & ~63
        if lease:
            root = self._lease(k, ro, q, p + size - q, _U8)
        else:
            root = copy_out(mv, q, p + size - q, _U8)
        bv = memoryview(root)  # read-only: so is every buffer cut from it
        pos = (mlen + 63) & ~63
        parts = []
        for ln in lens:
            parts.append(bv[pos : pos + ln])
            pos = (pos + ln + 63) & ~63
        return _loads(bv[:mlen], buffers=parts)

    def _lease(self, k: int, ro, start: int, nbytes: int, dtype):
        """The root array over [start, start + nbytes) of a read-only view of the mapping,
        slot ``k`` leased until it (and so every view cut from it) is gone."""
        root = _frombuffer(ro, dtype, nbytes // dtype.itemsize, start)
        ref = _Lease(root, self._unlease_cb)
        ref.k = k
        self._leases[k] = ref
        self.mv[self.lease0 + k] = 1
        return root

    def _unlease(self, ref) -> None:
        """The last view of a message is gone (any thread, any time): free its slot."""
        k = ref.k
        if self._leases.get(k) is ref:
            del self._leases[k]
            if self._fence is not None:  # every read of the views before the slot goes
                self._fence()
            try:
                self.mv[self.lease0 + k] = 0
            except ValueError:  # this end is closed: nobody writes here
                pass

    def _open_big(self, k: int, gen: int, cap: int) -> BigSegment:
        big = self._big.get(k)
        if big is not None:
            if big.gen == gen:
                return big
            del self._big[k]
            big.close()
        name = big_name(self.base, gen)
        index = self.index

        def joined(mm):
            # under the segment's flock: record this reader; the last one removes the name
            bw = memoryview(mm).cast("q")
            try:
                bw[big_rpid_word(index)] = os.getpid()
                if all(bw[big_rpid_word(r)] for r in range(bw[B_NREADERS])):
                    shm.unlink(name)
            finally:
                bw.release()

        mm = shm.open_existing(name, locked=joined)
        big = self._big[k] = BigSegment(mm, gen, cap, big_header(self.nreaders), -1)
        return big

    def _expire(self, seq: int) -> None:
        """Unmap big-value segments the writer can no longer use (see the module
        docstring); views still held keep theirs alive until they go."""
        for k in [k for k, b in self._big.items() if seq - b.last >= self.shrink_after]:
            self._big.pop(k).close()
        self._exp_at = (
            min(b.last for b in self._big.values()) + self.shrink_after if self._big else _NEVER
        )

    def _undecodable(self, exc: Exception):
        procs = self.waiter.procs
        src = self.writer_proc
        ctl = getattr(self.waiter, "control", None)
        if src < 0 and ctl is not None:  # the process that recorded the writer's pid
            wpid = self.w[W_WPID]
            src = next((i for i in range(len(procs)) if ctl.pid(i) == wpid), -1)
        who = procs[src] if 0 <= src < len(procs) else "its writer"
        return undecodable(exc, who, self.channel)

    def stats(self) -> dict:
        big = sum(b.size for b in self._big.values())
        return {
            "channel": self.channel,
            "role": "reader",
            "index": self.index,
            "big_segments": len(self._big),
            "big_bytes": big,
            "mapped_bytes": self.size + big,
            "leases": len(self._leases),
        }

    def wake(self) -> None:
        try:
            shm.futex_wake(self.addr + W_WSEQ * 8)
        except (ValueError, TypeError):
            pass

    def close(self) -> None:
        for b in self._big.values():
            b.close()
        self._big = {}
        # views still held keep the mapping: it stays valid under them, and goes with them
        release(self.w, self.ro, self.mv, self.mm)

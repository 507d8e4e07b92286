"""Shared-memory ring channels: one writer, any number of readers, ``slots`` messages.

Memory layout of one segment (all words are little-endian int64; each hot word has its
own 64-byte cache line so the writer and readers do not false-share)::

    offset  word            written by   meaning
    0       magic           creator      0x64616763 ("dagc")
    8       nslots          creator      ring length (= max_inflight)
    16      slot_stride     creator      bytes per slot, header included
    24      nreaders        creator
    32      writer_pid      writer       the pid of the process writing (set as it maps it)
    64      write_seq       writer       messages published; readers futex-wait on it
    128     writer_sleeping writer       1 while the writer blocks on a full ring
    192+128r  read_seq[r]     reader r     messages reader r has consumed; writer waits on it
    200+128r  reader_pid[r]   reader r     its pid (set as it maps it)
    256+128r  reader_sleeping[r] reader r  1 while reader r blocks in futex_wait
    M       slot_map[nslots] writer        slot_map[m % nslots]: the slot holding message m
    H       slot 0 .. slot nslots-1, each: [length, kind, ...pad to 64] + payload

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

Payload kinds: ARRAY (a plain C-contiguous numpy array as a value: ndim, dtype and shape in
a small header, then its bytes; no pickle at all), PICKLE (pickle protocol 5; out-of-band
buffers — numpy arrays and CPU torch tensors inside other values — are copied once into the
slot after the pickle bytes) and MOVED (the writer
outgrew the slot size: the message names a bigger segment and the same message number is
found there; readers follow, nobody fails).

Names: a segment's name only has to exist until every process that uses it has mapped it.
The DAG's own start-up removes the names of the segments it creates (see
``Control.mark_opened``); a grown segment's name is removed by the last of its readers to
follow the MOVED record (under a ``flock`` of the segment, so exactly one reader sees
that every reader's pid is there), and by the writer once every reader is past the MOVED
record, whichever comes first. The pids in the header are also how a segment whose every
process died is recognised as stale (``shm.sweep_stale``).

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
from dagc.runtime.channels.serialize import PickleEncoder

MAGIC = 0x64616763
W_NSLOTS, W_STRIDE, W_NREADERS = 1, 2, 3
W_WPID = 4
W_WSEQ = 8
W_WSLEEP = 16
SLOT_HDR = 64
KIND_PICKLE, KIND_MOVED, KIND_ARRAY = 1, 2, 3

# control segment words
C_STATE, C_WHO = 0, 1
C_MAGIC = 2                    # CTL_MAGIC: what shm.sweep_stale trusts (with owner and size)
C_OPENED = 3                   # processes of this node that have mapped all their segments
C_NODE_PROCS = 4               # how many processes of the DAG run on this node
C_PIDS = 8                     # pid of process i at word C_PIDS + i (0 = driver)
RUNNING, CLOSED, FAILED = 0, 1, 2

_ndarray = np.ndarray
_SCALARS = frozenset({int, float, bool, str, bytes, type(None)})
_frombuffer = np.frombuffer
_uint8 = np.uint8
_monotonic = time.monotonic
_yield = os.sched_yield
_loads = pickle.loads
_dumps = pickle.dumps


class ChannelClosed(Exception):
    """The DAG is being torn down; the loop should stop quietly."""


class PeerDied(Exception):
    """A process of the DAG died (``who`` names it)."""

    def __init__(self, who: str):
        super().__init__(who)
        self.who = who


class WaitTimeout(Exception):
    pass


def map_word(nreaders: int) -> int:
    """First word of the slot map: map[m % nslots] is the slot that holds message m."""
    return (256 + 128 * nreaders) // 8


def header_size(nreaders: int, slots: int) -> int:
    return 256 + 128 * nreaders + _round64(8 * slots)


def rseq_word(r: int) -> int:
    return (192 + 128 * r) // 8


def rsleep_word(r: int) -> int:
    return (256 + 128 * r) // 8


def rpid_word(r: int) -> int:
    """Reader r's pid: in its own read_seq line, written once as it maps the segment."""
    return rseq_word(r) + 1


def _round64(n: int) -> int:
    return (n + 63) & ~63


def segment_size(nreaders: int, slots: int, capacity: int) -> tuple[int, int]:
    stride = SLOT_HDR + _round64(capacity)
    return header_size(nreaders, slots) + slots * stride, stride


def create_segment(name: str, nreaders: int, slots: int, capacity: int, start_seq: int = 0):
    size, stride = segment_size(nreaders, slots, capacity)
    mm = shm.create(name, size)
    w = memoryview(mm).cast("q")
    w[W_NSLOTS], w[W_STRIDE], w[W_NREADERS] = slots, stride, nreaders
    w[W_WSEQ] = start_seq
    for r in range(nreaders):
        w[rseq_word(r)] = start_seq
    w[0] = MAGIC
    w.release()
    return mm


class Control:
    """A node's control segment of a DAG: run state and the pids of its processes there.

    ``create`` makes it with ``nprocs`` (the DAG's processes on this node, which
    :meth:`mark_opened` counts) and, if given, ``pid`` as process ``index``'s (the
    creator's, so a DAG whose creator dies before anyone else joins is stale).
    """

    def __init__(self, name: str, create: bool = False, nprocs: int = 0, index: int = -1,
                 pid: int = 0):
        self.name = name
        self.mm = shm.create(name, shm.CTL_SIZE) if create else shm.open_existing(name)
        self.words = memoryview(self.mm).cast("q")
        if create:
            self.words[C_NODE_PROCS] = nprocs
            if index >= 0:
                self.words[C_PIDS + index] = pid
            self.words[C_MAGIC] = shm.CTL_MAGIC       # last: a complete control segment

    def mark_opened(self, names) -> bool:
        """This process has mapped every segment of this node it needs: count it; the
        last process of the node to do so removes ``names`` (the node's segment names,
        this control's last), as nobody will open them by name again. Returns whether this
        call removed them. The count is taken under a flock of the segment, so exactly one
        process sees it complete."""
        def count():
            n = self.words[C_OPENED] + 1
            self.words[C_OPENED] = n
            if n < self.words[C_NODE_PROCS]:
                return False
            for name in names:
                if name != self.name:
                    shm.unlink(name)
            shm.unlink(self.name)
            return True
        return bool(shm.with_lock(self.name, count))

    @property
    def state(self) -> int:
        return self.words[C_STATE]

    def set_pid(self, index: int, pid: int) -> None:
        self.words[C_PIDS + index] = pid

    def pid(self, index: int) -> int:
        return self.words[C_PIDS + index]

    def fail(self, who_index: int) -> None:
        if self.words[C_STATE] == RUNNING:
            self.words[C_WHO] = who_index + 1
            self.words[C_STATE] = FAILED

    def close(self) -> None:
        try:
            if self.words[C_STATE] == RUNNING:
                self.words[C_STATE] = CLOSED
        except ValueError:  # already released
            pass

    def release(self) -> None:
        try:
            self.words.release()
            self.mm.close()
        except (BufferError, ValueError):
            pass


class Waiter:
    """How a process waits: the wait mode, the adaptive budget, and the health checks.

    ``procs`` are the DAG's process names by control index (0 = driver).
    """

    SPIN, BLOCK, ADAPTIVE = "spin", "block", "adaptive"
    MIN_BUDGET, MAX_BUDGET = 20e-6, 2e-3
    SLICE = 0.1                       # longest futex sleep between health checks

    def __init__(self, control: Control, procs: list[str], mode: str = "adaptive",
                 pids: list[int] | None = None):
        self.control = control
        self.cw = control.words
        self.procs = procs
        self.mode = mode
        self.budget = 200e-6 if mode == self.ADAPTIVE else (1e9 if mode == self.SPIN else 0.0)
        self._last_liveness = 0.0
        self.pids = pids

    def check(self, peers: tuple, deadline: float | None) -> None:
        """Raise ChannelClosed / PeerDied / WaitTimeout when the wait must end."""
        st = self.cw[C_STATE]
        if st != RUNNING:
            if st == FAILED:
                who = self.cw[C_WHO] - 1
                raise PeerDied(self.procs[who] if 0 <= who < len(self.procs) else "?")
            raise ChannelClosed()
        now = _monotonic()
        if now - self._last_liveness > 0.2:
            self._last_liveness = now
            for i in peers:
                pid = self.cw[C_PIDS + i]
                if pid and not shm.pid_alive(pid):
                    self.control.fail(i)
                    raise PeerDied(self.procs[i] if i < len(self.procs) else "?")
        if deadline is not None and now >= deadline:
            raise WaitTimeout()

    def wait(self, words, idx: int, target: int, addr: int, sleep_idx: int,
             peers: tuple, deadline: float | None = None) -> None:
        """Return once ``words[idx] >= target``."""
        if words[idx] >= target:
            return
        budget = self.budget
        if budget > 0.0:
            # Poll with sched_yield between looks: with more processes than cores the one
            # holding the data gets the CPU within a yield; the loop stays tight (16 looks
            # per clock read) because its period is the hand-off latency.
            t0 = _monotonic()
            n = 0
            while True:
                for _ in range(16):
                    _yield()
                    if words[idx] >= target:
                        return
                now = _monotonic()
                if now - t0 > budget:
                    break
                n += 1
                if not n & 63 or (deadline is not None and now >= deadline):
                    self.check(peers, deadline)
        t1 = _monotonic()
        while True:
            words[sleep_idx] = 1
            v = words[idx]
            if v >= target:
                words[sleep_idx] = 0
                break
            slice_ = self.SLICE
            if deadline is not None:
                slice_ = max(0.0, min(slice_, deadline - _monotonic()))
            shm.futex_wait(addr + idx * 8, v, slice_)
            words[sleep_idx] = 0
            if words[idx] >= target:
                break
            self.check(peers, deadline)
        if self.mode == self.ADAPTIVE:
            self._tune(_monotonic() - t1, False)

    def _tune(self, waited: float, in_budget: bool) -> None:
        # Waits that end inside the polling budget keep it; a wake-up shortly after the
        # budget ran out means the budget was a little short: double it. Long idle
        # sleeps shrink it back, so an idle DAG polls less before sleeping next time.
        if in_budget:
            return
        if waited < 4 * self.budget:
            self.budget = min(self.MAX_BUDGET, self.budget * 2)
        elif waited > 0.05:
            self.budget = max(self.MIN_BUDGET, self.budget / 2)


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
            hdr = _round64(16 + 8 * value.ndim + len(dt))
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
                need = (_round64(16 + 8 * len(raws)) + _round64(len(main))
                        + sum(_round64(r.nbytes) for r in raws))
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
                hdr = _round64(16 + 8 * ndim + dlen)
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

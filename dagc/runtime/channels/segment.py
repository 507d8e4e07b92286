"""One ring segment in shared memory: its layout, and how it is made.

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

Payload kinds: ARRAY (a plain C-contiguous numpy array as a value: ndim, dtype and shape in
a small header, then its bytes; no pickle at all), PICKLE (pickle protocol 5; out-of-band
buffers — numpy arrays and CPU torch tensors inside other values — are copied once into the
slot after the pickle bytes) and MOVED (the writer
outgrew the slot size: the message names a bigger segment and the same message number is
found there; readers follow, nobody fails).

The ring's two ends (``ring.Writer``, ``ring.Reader``) read and write it; the stale-segment
sweep (``channels.sweep``) reads its magic word, geometry and pids.
"""
from __future__ import annotations

from dagc.runtime.channels import shm

MAGIC = 0x64616763
W_NSLOTS, W_STRIDE, W_NREADERS = 1, 2, 3
W_WPID = 4
W_WSEQ = 8
W_WSLEEP = 16
SLOT_HDR = 64
KIND_PICKLE, KIND_MOVED, KIND_ARRAY = 1, 2, 3


def map_word(nreaders: int) -> int:
    """First word of the slot map: map[m % nslots] is the slot that holds message m."""
    return (256 + 128 * nreaders) // 8


def header_size(nreaders: int, slots: int) -> int:
    return 256 + 128 * nreaders + round64(8 * slots)


def rseq_word(r: int) -> int:
    return (192 + 128 * r) // 8


def rsleep_word(r: int) -> int:
    return (256 + 128 * r) // 8


def rpid_word(r: int) -> int:
    """Reader r's pid: in its own read_seq line, written once as it maps the segment."""
    return rseq_word(r) + 1


def round64(n: int) -> int:
    return (n + 63) & ~63


def segment_size(nreaders: int, slots: int, capacity: int) -> tuple[int, int]:
    stride = SLOT_HDR + round64(capacity)
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

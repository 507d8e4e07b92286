"""Payload layouts shared by both ends of a ring, and one process's mapping of a slot's
big-value segment (``<ring>.x<gen>``; see ``segment.py`` for its layout and ``ring.py`` for
its life: made by the writer, reused while big enough, unmapped after ``shrink_after``
messages without it, its name removed once every reader mapped it).
"""

from __future__ import annotations

import numpy as np

_frombuffer = np.frombuffer
_uint8 = np.uint8


def round64(n: int) -> int:
    return (n + 63) & ~63


class BigSegment:
    """One process's mapping of a slot's big-value segment."""

    __slots__ = ("mm", "mv", "ro", "w", "gen", "cap", "hdr", "last", "size")

    def __init__(self, mm, gen: int, cap: int, hdr: int, last: int):
        self.mm = mm
        self.mv = memoryview(mm)
        self.ro = self.mv.toreadonly()
        self.w = self.mv.cast("q")
        self.gen = gen
        self.cap = cap
        self.hdr = hdr
        self.last = last  # the last message that used it (as this end counts)
        self.size = len(mm)

    def close(self) -> None:
        # views a reader handed out keep the mapping (and this segment's memory) alive
        # until they are gone; mmap refuses to close under them, and need not
        release(self.w, self.ro, self.mv, self.mm)


def put_array(mv, w, p: int, arr) -> int:
    """A plain array at ``p``: [ndim, len(dtype), shape...], dtype str, then its bytes
    (64-byte aligned); returns the payload's length. One copy of the bytes."""
    dt = arr.dtype.str.encode()
    hw = p >> 3
    w[hw] = arr.ndim
    w[hw + 1] = len(dt)
    for j, d in enumerate(arr.shape):
        w[hw + 2 + j] = d
    q = p + 16 + 8 * arr.ndim
    mv[q : q + len(dt)] = dt
    hdr = round64(16 + 8 * arr.ndim + len(dt))
    need = hdr + arr.nbytes
    if arr.nbytes:
        mv[p + hdr : p + need] = arr.reshape(-1).view(_uint8)
    return need


def put_oob(mv, w, p: int, main, raws) -> None:
    """Pickle bytes and out-of-band buffers at ``p``: [nbufs, len(main), len(buf)...],
    then main, then each buffer, every part 64-byte aligned. One copy of each buffer."""
    hw = p >> 3
    w[hw] = len(raws)
    w[hw + 1] = len(main)
    for j, r in enumerate(raws):
        w[hw + 2 + j] = r.nbytes
    q = p + 16 + 8 * len(raws)
    q = (q + 63) & ~63
    mv[q : q + len(main)] = main
    q = (q + len(main) + 63) & ~63
    for r in raws:
        nb = r.nbytes
        mv[q : q + nb] = r
        q = (q + nb + 63) & ~63


def copy_out(mv, start: int, nbytes: int, dtype):
    """A private, read-only copy of [start, start + nbytes) as a 1-d array of ``dtype``
    (read-only like a view, so a value behaves the same whichever way it was read)."""
    root = _frombuffer(bytearray(mv[start : start + nbytes]), dtype)
    root.flags.writeable = False
    return root


def release(*objs) -> None:
    """Release memoryviews and close the mmap last; whatever has exports (views a reader
    handed out) is left alone and goes when they go."""
    for o in objs:
        try:
            if isinstance(o, memoryview):
                o.release()
            else:
                o.close()
        except (BufferError, ValueError):
            pass

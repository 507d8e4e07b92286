"""The reading end of a TCP channel: frames parsed out of what has arrived (``reader.py``
receives into the ring and the frame being received, and reads the messages; see
docs/tcp.md for the frames).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from dagc.runtime.channels.control import PeerDied
from dagc.runtime.channels.tcp.wire import (
    HDR,
    HDR_SIZE,
    KIND_CLOSE,
    KIND_DATA,
    KIND_FAIL,
    MAX_BUFS,
    MAX_NAME,
    RING,
    TcpProtocolError,
)

if TYPE_CHECKING:
    from dagc.runtime.channels.tcp.buffers import FrameBuffers


class Frames:
    """``TcpReader``'s frame parsing (everything it uses is ``TcpReader``'s, set up there)."""

    if TYPE_CHECKING:
        channel: str
        _buf: bytearray
        _mv: memoryview
        _lo: int
        _hi: int
        _big: list | None
        _buffers: FrameBuffers

    def _compact(self, need: int) -> None:
        """Move unparsed bytes to the front; grow the ring if ``need`` bytes will not fit."""
        lo, hi = self._lo, self._hi
        if need > len(self._buf):
            buf = bytearray(need)
            buf[: hi - lo] = self._mv[lo:hi]
            self._buf, self._mv = buf, memoryview(buf)
        elif lo:
            self._mv[: hi - lo] = self._mv[lo:hi]
        self._lo, self._hi = 0, hi - lo

    def _advance_big(self, big: list) -> None:
        """Past the targets of ``big`` (self._big) that are full."""
        targets = big[1]
        while big[2] < len(targets) and big[3] >= len(targets[big[2]]):
            big[2] += 1
            big[3] = 0

    def _parse(self):
        """A complete message from what has arrived, or None. Consumes its header."""
        big = self._big
        if big is not None:
            if big[2] < len(big[1]):
                return None
            self._big = None
            return big
        lo = self._lo
        avail = self._hi - lo
        if avail < HDR_SIZE:
            if lo + HDR_SIZE > len(self._buf):
                self._compact(0)
            return None
        kind, _, _, nbufs, mlen = HDR.unpack_from(self._buf, lo)
        if kind != KIND_DATA:
            if kind == KIND_CLOSE:
                self._lo = lo + HDR_SIZE
                return KIND_CLOSE
            if kind == KIND_FAIL and mlen <= MAX_NAME:
                if avail < HDR_SIZE + mlen:
                    if lo + HDR_SIZE + mlen > len(self._buf):
                        self._compact(0)
                    return None
                self._lo = lo + HDR_SIZE + mlen
                return PeerDied(
                    bytes(self._mv[lo + HDR_SIZE : lo + HDR_SIZE + mlen]).decode("utf-8", "replace")
                )
            raise TcpProtocolError(f"bad frame kind {kind} on channel {self.channel!r}")
        if nbufs == 0 and mlen <= RING - HDR_SIZE:
            end = lo + HDR_SIZE + mlen
            if self._hi >= end:
                self._lo = end
                return (lo + HDR_SIZE, end)
            if end > len(self._buf):
                self._compact(HDR_SIZE + mlen)
            return None
        if nbufs > MAX_BUFS:
            raise TcpProtocolError(f"frame with {nbufs} buffers on channel {self.channel!r}")
        hlen = HDR_SIZE + 8 * nbufs
        if avail < hlen:
            if lo + hlen > len(self._buf):
                self._compact(hlen)
            return None
        lens = struct.unpack_from(f"<{nbufs}Q", self._buf, lo + HDR_SIZE) if nbufs else ()
        # one blob laid out like the shm slot: pickle, then each buffer 64-byte aligned
        offs = []
        size = mlen
        for ln in lens:
            size = (size + 63) & ~63
            offs.append(size)
            size += ln
        if nbufs:
            blob = self._buffers.take(size + 64)
            shift = -blob.ctypes.data & 63  # put the buffers on 64-byte boundaries
            offs = [o + shift for o in offs]
        else:
            blob = bytearray(size)
            shift = 0
        bv = memoryview(blob)
        targets = [bv[shift : shift + mlen]]
        targets.extend(bv[o : o + ln] for o, ln in zip(offs, lens))
        targets = [t for t in targets if len(t)]
        # what the ring already holds of this frame
        p = lo + hlen
        hi = self._hi
        ti = 0
        filled = 0
        while ti < len(targets) and p < hi:
            t = targets[ti]
            k = min(len(t) - filled, hi - p)
            t[filled : filled + k] = self._mv[p : p + k]
            p += k
            filled += k
            if filled == len(t):
                ti += 1
                filled = 0
        self._lo = p
        if p == hi:
            self._lo = self._hi = 0
        ro = bv.toreadonly()  # arrays arrive read-only, as from a shm slot (ring.py)
        parts = [ro[o : o + ln] for o, ln in zip(offs, lens)]
        msg = [blob, targets, ti, filled, (shift, shift + mlen), parts]
        if ti < len(targets):
            self._big = msg
            return None
        return msg

"""The writing end of a ring, for a payload bigger than what its slot has reserved: the
rest of the slot reserved, or the slot's own big-value segment (``<ring>.x<gen>``) made,
reused and let go (see ``ring.py``'s docstring, "Big values"). ``Writer`` (``ring.py``)
inherits it; ``write`` comes here only for such a payload.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dagc.runtime.channels import shm
from dagc.runtime.channels.bigvalue import BigSegment, put_array, put_oob
from dagc.runtime.channels.segment import (
    KIND_ARRAY,
    KIND_BIG,
    KIND_PICKLE,
    KIND_SYNC,
    RESERVE0,
    SLOT_HDR,
    W_WSEQ,
    big_header,
    new_big,
    round_page,
)
from dagc.runtime.channels.serialize import PickleEncoder

if TYPE_CHECKING:
    from collections.abc import Callable


class BigWriter(PickleEncoder):
    """``Writer``'s big-value path (everything it uses is ``Writer``'s, set up there)."""

    if TYPE_CHECKING:
        base: str
        channel: str
        nreaders: int
        slots: int
        stride: int
        capacity: int
        shrink_after: int
        zc: int
        addr: int
        mv: memoryview
        w: memoryview
        map: int
        rseq: list[int]
        rsleep: list[int]
        slot_off: list[int]
        reserved: int
        stats_big_made: int
        _fd: int
        _fence: Callable[[], None] | None
        _room: list[int]
        _leasable: int
        _big: dict[int, BigSegment]
        _gen: int
        _names: list[tuple[str, int]]
        _maint: bool
        _kpickle: int

    def _write_big(
        self, value, deadline, seq: int, k: int, need: int, arr, main, raws
    ) -> bool | None:
        """The write of a payload that does not fit what slot ``k`` has reserved: reserve
        the rest of the slot (once per slot), or put it in the slot's big-value segment."""
        w = self.w
        off = self.slot_off[k]
        h = off >> 3
        big = None
        try:
            if need <= self.capacity:
                rest = self.stride - RESERVE0
                if not shm.reserve(self._fd, off + RESERVE0, rest):
                    raise shm.full_error(f"channel {self.channel}", rest, need)
                self.reserved += rest
                self._room[k] = self.capacity
                mv, words, p = self.mv, w, off + SLOT_HDR
            else:
                big = self._big.get(k)
                if big is None or big.cap < need or seq - big.last >= self.shrink_after:
                    big = self._new_big(k, need, seq)
                mv, words, p = big.mv, big.w, big.hdr
        except shm.ShmFullError as e:
            self._bufs.clear()
            return self._write_instead(e, value, deadline)
        if arr is not None:
            length, kind = put_array(mv, words, p, arr), KIND_ARRAY
        elif raws is None:
            mv[p : p + need] = main
            length, kind = need, KIND_PICKLE
        else:
            put_oob(mv, words, p, main, raws)
            length, kind = -need, KIND_PICKLE
            self._bufs.clear()
        if need >= self.zc and (arr is not None or raws is not None):
            self._leasable |= 1 << k
        w[h] = length
        if big is None:
            w[h + 1] = kind
        else:
            big.last = seq
            w[h + 2] = kind
            w[h + 3] = big.gen
            w[h + 4] = big.cap
            w[h + 1] = KIND_BIG
        n = self.slots
        w[self.map + seq % n] = k
        if self._fence is not None:  # payload and slot map before write_seq
            self._fence()
        w[W_WSEQ] = seq + 1  # publish
        for i in self.rsleep:
            if w[i]:
                shm.futex_wake(self.addr + W_WSEQ * 8)
                break
        if self._maint:
            self._maintain(seq + 1)
        return None  # sent

    def _new_big(self, k: int, need: int, seq: int) -> BigSegment:
        """Slot ``k``'s new big-value segment, ``need`` bytes (a page multiple), replacing
        its old one (every reader has read that one's last message: k is free)."""
        old = self._big.pop(k, None)
        if old is not None:
            old.close()
        cap = round_page(need)
        # a random generation, never a name that exists (segment.py): readers find it in
        # the slot header
        mm, gen, name = new_big(
            self.base, self.nreaders, k, cap, os.getpid(), need, old.gen if old is not None else 0
        )
        self._gen = gen
        self.stats_big_made += 1
        big = self._big[k] = BigSegment(mm, gen, cap, big_header(self.nreaders), seq)
        self._names.append((name, seq))
        self._maint = True
        return big

    def _maintain(self, next_seq: int) -> None:
        """After a write, while big-value segments exist: remove the names every reader
        has mapped (the fallback to the last reader's removal), unmap the segments no
        message can use any more."""
        w = self.w
        if self._names:
            low = min(w[i] for i in self.rseq)
            keep = []
            for name, first in self._names:
                if low > first:  # every reader read it, so mapped the segment
                    shm.unlink(name)
                else:
                    keep.append((name, first))
            self._names = keep
        self._kpickle = KIND_PICKLE  # the KIND_SYNC message (if any) went
        if self._big:
            gone = [k for k, b in self._big.items() if next_seq - b.last >= self.shrink_after]
            for k in gone:
                self._big.pop(k).close()
            if gone:  # readers off their fast path once, to let theirs go too
                self._kpickle = KIND_SYNC
        self._maint = bool(self._big or self._names or self._kpickle != KIND_PICKLE)

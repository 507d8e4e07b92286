"""Where a TCP reader receives frames with out-of-band buffers (numpy arrays, CPU tensors):
``recv_into`` straight into the buffer the values are then made from (no copy after the
kernel's), and for big frames the previous big frame's buffer again once every value made
from it is gone: a fresh buffer's pages fault in one by one as recv fills them (for 64 MiB
about a third of what copying it costs), a reused one's are already mapped.
"""

from __future__ import annotations

import weakref

import numpy as np

_empty = np.empty
_uint8 = np.uint8

# Frames from this size reuse the previous big frame's buffer.
REUSE_MIN = 1 << 20


class _Lent(weakref.ref):
    """A weak reference to the buffer a big frame was received into, with its store."""

    __slots__ = ("store",)
    store: np.ndarray


class FrameBuffers:
    """One reader's frame buffers: at most one spare (the last big frame's, once free)."""

    def __init__(self) -> None:
        self._spare: np.ndarray | None = None
        self._lent: dict = {}  # id -> _Lent of a buffer values still use
        self._closed = False

    def take(self, n: int):
        """A writable uint8 array of ``n`` bytes, not zero-filled (bytearray would write
        every page once before recv does)."""
        if n < REUSE_MIN:
            return _empty(n, _uint8)
        store = self._spare
        if store is None or not n <= len(store) <= 2 * n:
            store = _empty(n, _uint8)
        self._spare = None
        root = store[:n]  # the values keep this view, and so the store
        ref = _Lent(root, self._give_back)
        ref.store = store
        self._lent[id(ref)] = ref
        return root

    def _give_back(self, ref) -> None:
        """The last value made from a big frame's buffer is gone (any thread)."""
        self._lent.pop(id(ref), None)
        if not self._closed:
            self._spare = ref.store

    def close(self) -> None:
        self._closed = True
        self._spare = None

"""Shared-memory segments and futexes: the two kernel facilities dagc's channels stand on.

Segments are files in /dev/shm created with O_EXCL and mode 0600 under unguessable names
(``dagc-<compile token>-<what>``), so only this user's processes can map them and nobody can
pre-create one. A name only lives until every process that needs the segment has mapped it
(Linux keeps the mappings of an unlinked file): the last process of a node to open its
ends removes the node's names (:meth:`control.Control.mark_opened`), the last reader to
follow a grown channel removes the new segment's name. Everything a compiled DAG creates
shares its prefix; teardown (or any survivor noticing a death) removes whatever is left of
the prefix. When every process of a DAG died inside one of the short windows where a name
exists (nobody left to clean), the next compile on the node removes it
(``channels/sweep.py``), trusting only this user's own, well-formed segments.

Space: tmpfs allocates a page when it is first written, and a write past the size limit of
/dev/shm (64 MiB in a default Docker container) is a SIGBUS that kills the process. So
every byte a channel writes is reserved first (:func:`reserve`, ``posix_fallocate``): a
full /dev/shm is a :class:`ShmFullError` naming what was needed, what is free and the
fix, raised before anything is touched.

Futexes: FUTEX_WAIT/FUTEX_WAKE on a 32-bit word inside a shared mapping, called through
ctypes (which releases the GIL for the call). Without the shared flag cleared (no
FUTEX_PRIVATE_FLAG) they work across processes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import stat

from dagc.errors import DagcError

SHM_DIR = "/dev/shm"
PREFIX = "dagc-"
OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC  # never through a symlink

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_FUTEX_PRIVATE = 128
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(
    platform.machine().lower()
)
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# Memory order. A ring publishes with plain stores (ring.py: payload, slot map, then the
# sequence word) and a reader hands a slot back with one (its read_seq). x86-64 keeps
# stores in order and loads in order, so nothing more is needed there. aarch64 (Grace,
# Graviton) reorders both: there each end issues a full barrier at the four points the
# protocol needs one (ring.py, "Memory order"). The barrier is the futex system call: a
# FUTEX_WAKE runs the kernel's smp_mb() before it looks for waiters (barrier (B) of the
# futex ordering guarantee, which no-lost-wakeup depends on, on every kernel), so a wake of
# a private word nobody waits on is a full fence for its caller, about 0.3 us. Any other
# machine is refused (RingUnsupportedError) rather than run unordered.
STRONGLY_ORDERED = frozenset({"x86_64", "amd64"})
FENCED = frozenset({"aarch64", "arm64"})
_FENCE_WORD = ctypes.c_int32(0)
_FENCE_ARGS = (
    ctypes.c_long(_SYS_FUTEX or 0),
    ctypes.c_void_p(ctypes.addressof(_FENCE_WORD)),
    ctypes.c_long(_FUTEX_WAKE | _FUTEX_PRIVATE),
    ctypes.c_long(1),
    ctypes.c_void_p(0),
    ctypes.c_void_p(0),
    ctypes.c_long(0),
)


def fence() -> None:
    """A full memory barrier for the calling thread (see "Memory order" above)."""
    _syscall(*_FENCE_ARGS)


class RingUnsupportedError(DagcError, RuntimeError):
    """Shared-memory channels cannot be made on this machine type (memory order)."""


def ring_fence():
    """What a ring end calls where its protocol needs a barrier on this machine: None on
    x86-64 (none needed), :func:`fence` on aarch64; RingUnsupportedError elsewhere."""
    machine = platform.machine()
    m = machine.lower()
    if m in STRONGLY_ORDERED:
        return None
    if m in FENCED and _SYS_FUTEX is not None:
        return fence
    raise RingUnsupportedError(
        f"dagc's shared-memory channels are not made on this machine ({machine or 'unknown'}): "
        f"they are correct on x86-64 (stores in order) and on aarch64 (with barriers), and "
        f"this CPU's memory order is neither. Run the DAG's processes on x86-64 or aarch64 "
        f"nodes, or run this graph with Ray Compiled Graph itself "
        f"(dag.experimental_compile() without dagc.patch_ray())."
    )


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout: float) -> None:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``timeout`` seconds."""
    if _SYS_FUTEX is None:  # pragma: no cover - unknown architecture: nap instead
        import time

        time.sleep(min(timeout, 0.001))
        return
    ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
    _syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_long(_FUTEX_WAIT),
        ctypes.c_long(ctypes.c_int32(expected & 0xFFFFFFFF).value),
        ctypes.byref(ts),
        ctypes.c_void_p(0),
        ctypes.c_long(0),
    )


def futex_wake(addr: int) -> None:
    """Wake every sleeper on the u32 at ``addr``."""
    if _SYS_FUTEX is None:  # pragma: no cover
        return
    _syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_long(_FUTEX_WAKE),
        ctypes.c_long(0x7FFFFFFF),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_long(0),
    )


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep payload-sized allocations on glibc's heap instead of fresh mmaps.

    A channel read allocates one buffer per payload; from glibc's default 128 KiB mmap
    threshold up, each such buffer is a new mapping whose pages fault in on first touch
    (about as costly as the copy itself). glibc raises the threshold by itself after
    freeing such a block, up to 32 MiB (and the trim threshold to twice that); dagc sets
    those same ceilings up front, once per process. DAGC_MALLOC_TUNE=0 turns this off.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    from dagc import config

    if not config.MALLOC_TUNE:
        return
    try:
        mallopt = _libc.mallopt
    except AttributeError:  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def dag_prefix(token: str) -> str:
    """The name prefix of every segment of the compiled DAG whose token is ``token``."""
    return f"{PREFIX}{token}-"


def path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


class ShmFullError(DagcError, MemoryError):
    """A channel could not reserve the shared memory a value needs (``/dev/shm`` is full).

    Raised before anything is written (never a SIGBUS); the execution whose value did not
    fit fails with it, and the DAG goes on for values that fit. ``needed``, ``free`` and
    ``total`` are bytes."""

    def __new__(cls, *args, **kwargs):
        # MemoryError's own __new__ (a free list) refuses subclasses that mix in other
        # bases, as the TaskError a get() raises for it does: build it as any exception
        return BaseException.__new__(cls, *args)

    def __init__(self, message: str, needed: int = 0, free: int = 0, total: int = 0):
        super().__init__(message)
        self.needed, self.free, self.total = needed, free, total

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.needed, self.free, self.total))


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def shm_space() -> tuple[int, int]:
    """(free, total) bytes of the file system under SHM_DIR (0, 0 if it cannot be told)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0, 0
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def full_error(what: str, needed: int, value_bytes: int = 0) -> ShmFullError:
    """The error for a reservation of ``needed`` bytes that /dev/shm could not hold."""
    free, total = shm_space()
    val = f" for a value of {mib(value_bytes)}" if value_bytes else ""
    return ShmFullError(
        f"{what} could not reserve {mib(needed)} of shared memory in {SHM_DIR}{val}: "
        f"{mib(free)} free of {mib(total)}. Nothing was written; smaller values still go "
        f"through. Give the processes more shared memory (docker run --shm-size=<size>; "
        f"Kubernetes: an emptyDir volume with medium: Memory mounted at /dev/shm), send "
        f"smaller values, or compile with a smaller max_inflight or buffer_size (each "
        f"value in flight or held by a reader keeps its own copy).",
        needed,
        free,
        total,
    )


def _fallocate(fd: int, offset: int, length: int) -> None:
    os.posix_fallocate(fd, offset, length)


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate ``length`` bytes at ``offset`` of segment ``fd`` now, so that writing them
    can never SIGBUS. False when /dev/shm has no room (ENOSPC); a file system that cannot
    reserve (EOPNOTSUPP) counts as done: it allocates as it is written, as before."""
    if length <= 0:
        return True
    try:
        _fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG):
            return False
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return True
        raise
    return True


def create(name: str, size: int, reserve_ranges=(), what: str = "", keep_fd: bool = False):
    """Create a new segment (fails if the name exists) and map it.

    ``reserve_ranges`` ((offset, length), ...) are allocated before anything is mapped;
    when /dev/shm cannot hold them the segment is removed again and :class:`ShmFullError`
    (naming ``what``) is raised. ``keep_fd``: return (mmap, fd), the caller closes fd."""
    fd = os.open(path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, ln in reserve_ranges:
            if not reserve(fd, off, ln):
                unlink(name)
                raise full_error(what or f"segment {name}", sum(n for _, n in reserve_ranges))
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    if keep_fd:
        return mm, fd
    os.close(fd)
    return mm


def open_existing(name: str, locked=None, keep_fd: bool = False):
    """Map an existing segment (never through a symlink).

    ``locked(mm)``, if given, runs under an exclusive ``flock`` of the segment, which
    orders it against every other process's ``locked`` call on the same segment (a
    "last one to arrive" decision needs that; plain stores would not be enough).
    ``keep_fd``: return (mmap, fd), the caller closes fd.
    """
    fd = os.open(path(name), os.O_RDWR | OPEN_FLAGS)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size)
        if locked is not None:
            locked_call(fd, locked, mm)
    except BaseException:
        os.close(fd)
        raise
    if keep_fd:
        return mm, fd
    os.close(fd)
    return mm


def locked_call(fd: int, fn, *args):
    """``fn(*args)`` under an exclusive flock of ``fd`` (released explicitly: mmap keeps a
    duplicate of the descriptor, which would otherwise keep the lock)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return fn(*args)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def with_lock(name: str, fn, *args):
    """``fn(*args)`` under an exclusive flock of segment ``name``; None if it is gone."""
    try:
        fd = os.open(path(name), os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        return locked_call(fd, fn, *args)
    finally:
        os.close(fd)


def address(mm: mmap.mmap) -> int:
    """The address of a mapping's first byte (for futex calls)."""
    buf = (ctypes.c_char * 1).from_buffer(mm)
    addr = ctypes.addressof(buf)
    del buf
    return addr


def unlink(name: str) -> None:
    try:
        os.unlink(path(name))
    except FileNotFoundError:
        pass


def unlink_prefix(prefix: str) -> int:
    """Remove every segment of ours whose name starts with ``prefix``; returns how many.

    Names are visible to every user, so another user can plant a file under a live DAG's
    prefix: only this user's regular files are removed, anything else is left alone.
    """
    assert prefix.startswith(PREFIX) and len(prefix) > len(PREFIX) + 8, prefix
    n = 0
    uid = os.getuid()
    for name in names(prefix):
        p = path(name)
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            os.unlink(p)
            n += 1
        except OSError:  # removed meanwhile
            pass
    return n


def names(prefix: str) -> list[str]:
    """Names in SHM_DIR that start with ``prefix``. A plain listing: /dev/shm can hold
    thousands of other programs' entries, and glob's pattern matching costs twice as much."""
    return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return False

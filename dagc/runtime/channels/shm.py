"""Shared-memory segments and futexes: the two kernel facilities dagc's channels stand on.

Segments are files in /dev/shm created with O_EXCL and mode 0600 under unguessable names
(``dagc-<compile token>-<what>``), so only this user's processes can map them and nobody can
pre-create one. A name only lives until every process that needs the segment has mapped it
(Linux keeps the mappings of an unlinked file): the last process of a node to open its
ends removes the node's names (:meth:`channel.Control.mark_opened`), the last reader to
follow a grown channel removes the new segment's name. Everything a compiled DAG creates
shares its prefix; teardown (or any survivor noticing a death) removes whatever is left of
the prefix. When every process of a DAG died inside one of the short windows where a name
exists (nobody left to clean), the next compile on the node removes it
(:func:`sweep_stale`), trusting only this user's own, well-formed segments.

Futexes: FUTEX_WAIT/FUTEX_WAKE on a 32-bit word inside a shared mapping, called through
ctypes (which releases the GIL for the call). Without the shared flag cleared (no
FUTEX_PRIVATE_FLAG) they work across processes.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import re
import stat
import struct

SHM_DIR = "/dev/shm"
PREFIX = "dagc-"
CTL_SIZE = 4096       # bytes of a control segment
CTL_PIDS = 8          # word of the first pid in a control segment (= channel.C_PIDS)
CTL_MAGIC_WORD = 2    # (= channel.C_MAGIC)
CTL_MAGIC = int.from_bytes(b"dagc-ctl", "little")
_CTL_NAME = re.compile(r"^(dagc-[0-9a-f]{24}-)ctl(\.\d+)?$")   # ctl.<node index>
_CHAN_NAME = re.compile(r"^(dagc-[0-9a-f]{24}-)c\d+(\.g\d+)?$")  # c<n>[.g<generation>]
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(
    platform.machine().lower())
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout: float) -> None:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``timeout`` seconds."""
    if _SYS_FUTEX is None:  # pragma: no cover - unknown architecture: nap instead
        import time
        time.sleep(min(timeout, 0.001))
        return
    ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAIT),
             ctypes.c_long(ctypes.c_int32(expected & 0xFFFFFFFF).value), ctypes.byref(ts),
             ctypes.c_void_p(0), ctypes.c_long(0))


def futex_wake(addr: int) -> None:
    """Wake every sleeper on the u32 at ``addr``."""
    if _SYS_FUTEX is None:  # pragma: no cover
        return
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAKE),
             ctypes.c_long(0x7FFFFFFF), ctypes.c_void_p(0), ctypes.c_void_p(0),
             ctypes.c_long(0))


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
    except AttributeError:   # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def create(name: str, size: int) -> mmap.mmap:
    """Create a new segment (fails if the name exists) and map it."""
    fd = os.open(path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def open_existing(name: str, locked=None) -> mmap.mmap:
    """Map an existing segment (never through a symlink).

    ``locked(mm)``, if given, runs under an exclusive ``flock`` of the segment, which
    orders it against every other process's ``locked`` call on the same segment (a
    "last one to arrive" decision needs that; plain stores would not be enough).
    """
    fd = os.open(path(name), os.O_RDWR | _OPEN_FLAGS)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size)
        if locked is not None:
            locked_call(fd, locked, mm)
        return mm
    finally:
        os.close(fd)


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
        fd = os.open(path(name), os.O_RDONLY | _OPEN_FLAGS)
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
    for name in _names(prefix):
        p = path(name)
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            os.unlink(p)
            n += 1
        except OSError:           # removed meanwhile
            pass
    return n


def _names(prefix: str) -> list[str]:
    """Names in SHM_DIR that start with ``prefix``. A plain listing: /dev/shm can hold
    thousands of other programs' entries, and glob's pattern matching costs twice as much."""
    return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


def _read_own(name: str, nbytes: int) -> tuple[int, bytes] | None:
    """(size, first ``nbytes`` bytes) of segment ``name`` if it is a regular file owned by
    this user with a single link; None for anything else (another user's file, a symlink,
    a FIFO, a directory, a hard link), which is never opened beyond O_NOFOLLOW|O_NONBLOCK."""
    p = path(name)
    uid = os.getuid()
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return None
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS)
    except OSError:           # removed meanwhile, replaced by a symlink (ELOOP), ...
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_nlink != 1:
            return None
        return st.st_size, os.pread(fd, nbytes, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _ctl_pids(name: str) -> list[int] | None:
    """The pids a trusted control segment lists, or None if ``name`` is not one: this
    user's regular file of exactly CTL_SIZE bytes with the control magic word."""
    got = _read_own(name, CTL_SIZE)
    if got is None:
        return None
    size, data = got
    if size != CTL_SIZE or len(data) != CTL_SIZE:
        return None
    words = struct.unpack_from(f"<{CTL_SIZE // 8}q", data)
    if words[CTL_MAGIC_WORD] != CTL_MAGIC:
        return None
    return [pid for pid in words[CTL_PIDS:] if pid > 0]


def _channel_pids(name: str) -> list[int] | None:
    """The pids recorded in a trusted channel segment (its writer's and each reader's, as
    they mapped it), or None if ``name`` is not one: this user's regular file whose header
    carries the channel magic word and whose size matches its own geometry."""
    from dagc.runtime.channels import ring as ch
    got = _read_own(name, 64)
    if got is None:
        return None
    size, data = got
    if len(data) < 64:
        return None
    magic, nslots, stride, nreaders = struct.unpack_from("<4q", data)
    if (magic != ch.MAGIC or not 0 < nslots <= 1 << 16 or not 0 < nreaders <= 1 << 12
            or stride < ch.SLOT_HDR or stride % 64):
        return None
    hdr = ch.header_size(nreaders, nslots)
    if size != hdr + nslots * stride:
        return None
    got = _read_own(name, hdr)
    if got is None or len(got[1]) < hdr:
        return None
    data = got[1]
    words = [ch.W_WPID] + [ch.rpid_word(r) for r in range(nreaders)]
    return [pid for pid in (struct.unpack_from("<q", data, 8 * i)[0] for i in words) if pid > 0]


def _stale(pids: list[int] | None) -> bool:
    return bool(pids) and not any(pid_alive(pid) for pid in pids)


def _scan() -> tuple[list[str], list[str]]:
    """(stale prefixes, stale channel segments outside them); see the two functions below."""
    names = _names(PREFIX)
    ctl_of: dict[str, bool] = {}            # prefix -> some trusted control is stale
    for name in names:
        m = _CTL_NAME.match(name)
        if m:
            pids = _ctl_pids(name)
            if pids is not None:
                ctl_of[m.group(1)] = ctl_of.get(m.group(1), False) or _stale(pids)
    segs = []
    for name in names:
        m = _CHAN_NAME.match(name)
        if m and m.group(1) not in ctl_of and _stale(_channel_pids(name)):
            segs.append(name)
    return sorted(p for p, stale in ctl_of.items() if stale), segs


def stale_prefixes() -> list[str]:
    """Prefixes of compiled DAGs whose every recorded process is gone.

    A control segment lists the pids of the DAG's processes on its node (unset words are
    0); a DAG with some pid listed and every listed pid dead is stale. One still being
    created lists none, or a live one. Only trusted control segments count (see
    :func:`_ctl_pids`): names in /dev/shm are visible to, and can be made by, every user.
    """
    return _scan()[0]


def stale_segments() -> list[str]:
    """Channel segments, of DAGs without a trusted control segment here, whose every
    recorded process is gone: a grown channel whose processes all died before its last
    reader followed it (its name outlives the control segment's, which goes at start)."""
    return _scan()[1]


def sweep_stale() -> int:
    """Remove what stale DAGs left (see :func:`stale_prefixes`, :func:`stale_segments`);
    returns how many names. Never touches another user's file or anything not well-formed."""
    n = 0
    prefixes, segs = _scan()
    for prefix in prefixes:
        n += unlink_prefix(prefix)
    for name in segs:
        try:
            os.unlink(path(name))
            n += 1
        except OSError:
            pass
    return n


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
        return data[data.rindex(b")") + 2:data.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return False

"""Shared-memory segments and futexes: the two kernel facilities dagc's channels stand on.

Segments are files in /dev/shm created with O_EXCL and mode 0600 under unguessable names
(``dagc-<compile token>-<what>``), so only this user's processes can map them and nobody can
pre-create one. Everything a compiled DAG creates shares its prefix; teardown (or any
survivor noticing a death) removes the whole prefix, so a crash leaves nothing behind.
When every process of a DAG died at once (nobody left to clean), the next compile on the
node removes its segments (:func:`sweep_stale`).

Futexes: FUTEX_WAIT/FUTEX_WAKE on a 32-bit word inside a shared mapping, called through
ctypes (which releases the GIL for the call). Without the shared flag cleared (no
FUTEX_PRIVATE_FLAG) they work across processes.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
import struct

SHM_DIR = "/dev/shm"
PREFIX = "dagc-"
CTL_PIDS = 8          # word of the first pid in a control segment (= channel.C_PIDS)
_CTL_NAME = re.compile(r"^(dagc-[0-9a-f]{24}-)ctl(\.\d+)?$")   # ctl.<node index>

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


def open_existing(name: str) -> mmap.mmap:
    fd = os.open(path(name), os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
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
    """Remove every segment whose name starts with ``prefix``; returns how many."""
    assert prefix.startswith(PREFIX) and len(prefix) > len(PREFIX) + 8, prefix
    n = 0
    for name in _names(prefix):
        try:
            os.unlink(path(name))
            n += 1
        except FileNotFoundError:
            pass
    return n


def _names(prefix: str) -> list[str]:
    """Names in SHM_DIR that start with ``prefix``. A plain listing: /dev/shm can hold
    thousands of other programs' entries, and glob's pattern matching costs twice as much."""
    return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


def stale_prefixes() -> list[str]:
    """Prefixes of compiled DAGs whose every recorded process is gone.

    A DAG's segments are removed by teardown or by a survivor noticing a death; when the
    driver and all its actors die together (the driver is SIGKILLed and Ray then kills
    the actors it owned) nobody is left to do it. A control segment lists the pids of
    the DAG's processes on its node (unset words are 0); a DAG with some pid listed and
    every listed pid dead is stale. One still being created lists none, or a live one.
    """
    out = set()
    for name in _names(PREFIX):
        m = _CTL_NAME.match(name)
        if not m:
            continue
        try:
            with open(path(name), "rb") as f:
                data = f.read(4096)
        except OSError:           # removed meanwhile, or another user's
            continue
        if len(data) < 4096:
            continue
        pids = [pid for pid in struct.unpack_from(f"<{512 - CTL_PIDS}q", data, CTL_PIDS * 8)
                if pid > 0]
        if pids and not any(pid_alive(pid) for pid in pids):
            out.add(m.group(1))
    return sorted(out)


def sweep_stale() -> int:
    """Remove the segments of every stale DAG (see :func:`stale_prefixes`); how many."""
    n = 0
    for prefix in stale_prefixes():
        n += unlink_prefix(prefix)
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
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return False

"""What DAGs whose every process died left in /dev/shm, found and removed.

A segment's name exists only in the short windows before every process that needs it has
mapped it (see ``shm``). When every process of a DAG dies inside such a window, nobody is
left to remove the names; the next compile on the node does (:func:`sweep_stale`),
trusting only this user's own, well-formed segments: a control segment of exactly
``CTL_SIZE`` bytes with the control magic word, a ring or big-value segment with its magic
word whose size matches its own header. Names in /dev/shm are visible to, and can be made
by, every user.
"""

from __future__ import annotations

import os
import re
import stat
import struct

from dagc.runtime.channels import segment, shm
from dagc.runtime.channels.control import C_MAGIC, C_PIDS, CTL_MAGIC, CTL_SIZE

_CTL_NAME = re.compile(r"^(dagc-[0-9a-f]{24}-)ctl(\.\d+)?$")  # ctl.<node index>
_CHAN_NAME = re.compile(r"^(dagc-[0-9a-f]{24}-)c\d+(\.x\d+)?$")  # c<n>[.x<big-value gen>]


def _read_own(name: str, nbytes: int) -> tuple[int, bytes] | None:
    """(size, first ``nbytes`` bytes) of segment ``name`` if it is a regular file owned by
    this user with a single link; None for anything else (another user's file, a symlink,
    a FIFO, a directory, a hard link), which is never opened beyond O_NOFOLLOW|O_NONBLOCK."""
    p = shm.path(name)
    uid = os.getuid()
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return None
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | shm.OPEN_FLAGS)
    except OSError:  # removed meanwhile, replaced by a symlink (ELOOP), ...
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
    if words[C_MAGIC] != CTL_MAGIC:
        return None
    return [pid for pid in words[C_PIDS:] if pid > 0]


def _channel_pids(name: str) -> list[int] | None:
    """The pids recorded in a trusted channel segment (its writer's and each reader's, as
    they mapped it), or None if ``name`` is not one: this user's regular file whose header
    carries a ring's or a big-value segment's magic word and whose size matches its own
    geometry."""
    got = _read_own(name, 64)
    if got is None:
        return None
    size, data = got
    if len(data) < 64:
        return None
    magic = struct.unpack_from("<q", data)[0]
    if magic == segment.RING_MAGIC:
        _, nslots, stride, nreaders, _, nphys = struct.unpack_from("<6q", data)
        if (
            not 0 < nslots <= 1 << 16
            or not 0 < nreaders <= 1 << 12
            or stride < segment.SLOT_HDR
            or stride % 64
            or nphys != segment.physical_slots(nreaders, nslots)
        ):
            return None
        hdr = segment.header_size(nreaders, nslots)
        if size != hdr + nphys * stride:
            return None
        words = [segment.W_WPID] + [segment.rpid_word(r) for r in range(nreaders)]
    elif magic == segment.BIG_MAGIC:
        _, cap, nreaders = struct.unpack_from("<3q", data)
        if not 0 < nreaders <= 1 << 12 or cap <= 0 or size != segment.big_size(nreaders, cap):
            return None
        hdr = segment.big_header(nreaders)
        words = [segment.B_WPID] + [segment.big_rpid_word(r) for r in range(nreaders)]
    else:
        return None
    got = _read_own(name, hdr)
    if got is None or len(got[1]) < hdr:
        return None
    data = got[1]
    return [pid for pid in (struct.unpack_from("<q", data, 8 * i)[0] for i in words) if pid > 0]


def _stale(pids: list[int] | None) -> bool:
    if not pids:
        return False
    return not any(shm.pid_alive(pid) for pid in pids)


def _scan() -> tuple[list[str], list[str]]:
    """(stale prefixes, stale channel segments outside them); see the two functions below."""
    names = shm.names(shm.PREFIX)
    ctl_of: dict[str, bool] = {}  # prefix -> some trusted control is stale
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
    recorded process is gone: a big-value segment whose processes all died before its
    last reader mapped it (its name outlives the control segment's, which goes at start)."""
    return _scan()[1]


def sweep_stale() -> int:
    """Remove what stale DAGs left (see :func:`stale_prefixes`, :func:`stale_segments`);
    returns how many names. Never touches another user's file or anything not well-formed."""
    n = 0
    prefixes, segs = _scan()
    for prefix in prefixes:
        n += shm.unlink_prefix(prefix)
    for name in segs:
        try:
            os.unlink(shm.path(name))
            n += 1
        except OSError:
            pass
    return n

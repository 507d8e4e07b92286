"""One ring segment in shared memory, and the big-value segments beside it: layouts, and
how they are made.

Memory layout of a ring segment (all words are little-endian int64; each hot word has its
own 64-byte cache line so the writer and readers do not false-share)::

    offset  word              written by   meaning
    0       magic             creator      RING_MAGIC ("dagcrng2")
    8       nslots            creator      the window: messages unread at most (= max_inflight)
    16      slot_stride       creator      bytes per slot, header included
    24      nreaders          creator
    32      writer_pid        writer       the pid of the process writing (set as it maps it)
    40      nphys             creator      physical slots: nslots + nreaders * lease budget
    48      shrink_after      creator      a big-value segment unused this many messages goes
    56      zero_copy_min     creator      payloads from this size are read as views (leased)
    64      write_seq         writer       messages published; readers futex-wait on it
    128     writer_sleeping   writer       1 while the writer blocks on a full ring
    192+128r  read_seq[r]     reader r     messages reader r has consumed; writer waits on it
    200+128r  reader_pid[r]   reader r     its pid (set as it maps it)
    256+128r  reader_sleeping[r] reader r  1 while reader r blocks in futex_wait
    M       slot_map[nslots]  writer       slot_map[m % nslots]: the slot holding message m
    L+64r'  lease[r][nphys]   reader r     one byte per slot: 1 while reader r's views of the
                                           message it read there are alive (r' = rounded)
    H       slot 0 .. slot nphys-1 (H page-aligned), each: header + payload:
              [length, kind, inner kind, big gen, big size, 0, 0, 0] + payload

Payload kinds: ARRAY (a plain C-contiguous numpy array as a value: ndim, dtype and shape in
a small header, then its bytes; no pickle at all), PICKLE (pickle protocol 5; a negative
length means out-of-band buffers — numpy arrays and CPU torch tensors inside other values —
copied once into the slot after the pickle bytes, 64-byte aligned) and BIG (the payload,
laid out exactly as it would be in the slot, lives in the slot's big-value segment; the
slot header names its generation and size, and the inner kind).

A big-value segment (``<ring>.x<gen>``) belongs to one slot of one ring; ``gen`` is drawn at
random (the slot header carries it to the readers), so nobody can create the next name
first, and a name that exists anyway is skipped. Its layout::

    0       magic             writer       BIG_MAGIC ("dagcbig2")
    8       capacity          writer       payload bytes
    16      nreaders          writer
    24      writer_pid        writer
    32      slot              writer       the ring slot it extends
    64+8r   reader_pid[r]     reader r     set as it maps it (the last one removes the name)
    BIG_HDR(nreaders)         payload, page-aligned

The ring's two ends (``ring.Writer``, ``ring.Reader``) read and write these; the
stale-segment sweep (``channels.sweep``) reads their magic words, geometry and pids.
"""

from __future__ import annotations

import secrets

from dagc.runtime.channels import shm

RING_MAGIC = int.from_bytes(b"dagcrng2", "little")
BIG_MAGIC = int.from_bytes(b"dagcbig2", "little")
MAGIC = RING_MAGIC
W_NSLOTS, W_STRIDE, W_NREADERS = 1, 2, 3
W_WPID = 4
W_NPHYS = 5
W_SHRINK = 6
W_ZCMIN = 7
W_WSEQ = 8
W_WSLEEP = 16
SLOT_HDR = 64
KIND_PICKLE, KIND_BIG, KIND_ARRAY = 1, 2, 3
# An in-band pickle the writer marks after it let big-value segments go: it takes the
# readers off their fast path once, so they let go of theirs too (ring.py, "Big values").
KIND_SYNC = 4
PAGE = 4096

# Slot header words, relative to the slot's first word.
S_LEN, S_KIND, S_INNER, S_GEN, S_SIZE = 0, 1, 2, 3, 4

# How many of its messages a reader may keep as leased views at once (per channel); past
# that, reads copy (the writer must always find a free slot without waiting).
LEASE_BUDGET_MAX = 16
# A slot's big-value segment goes once this many messages were written without using it.
SHRINK_AFTER = 64
# Payloads (the array's or out-of-band buffers' bytes) from this size are read as views of
# the slot; smaller ones are copied (cheaper than a lease, and they free the slot at once).
ZERO_COPY_MIN = 64 << 10
# Pickle bytes and headers fit beside ``buffer_size`` payload bytes in one slot.
SLOT_SLACK = 4096
# What a slot has reserved from the start: enough for small messages and Failures.
RESERVE0 = 4096

# Random big-value segment names that may exist before a write gives up (each is 62 bits).
NAME_TRIES = 64
# Big-value segment header words.
B_CAP, B_NREADERS, B_WPID, B_SLOT = 1, 2, 3, 4


def lease_budget(slots: int) -> int:
    return min(slots, LEASE_BUDGET_MAX)


def physical_slots(nreaders: int, slots: int) -> int:
    """Slots a ring has: its window, plus every reader's lease budget, so the writer always
    finds one that no unread message and no live view holds."""
    return slots + nreaders * lease_budget(slots)


def map_word(nreaders: int) -> int:
    """First word of the slot map: map[m % nslots] is the slot that holds message m."""
    return (256 + 128 * nreaders) // 8


def lease_offset(nreaders: int, slots: int, r: int) -> int:
    """Byte offset of reader r's lease bytes (one per physical slot)."""
    nphys = physical_slots(nreaders, slots)
    return 256 + 128 * nreaders + round64(8 * slots) + r * round64(nphys)


def header_size(nreaders: int, slots: int) -> int:
    nphys = physical_slots(nreaders, slots)
    return round_page(256 + 128 * nreaders + round64(8 * slots) + nreaders * round64(nphys))


def rseq_word(r: int) -> int:
    return (192 + 128 * r) // 8


def rsleep_word(r: int) -> int:
    return (256 + 128 * r) // 8


def rpid_word(r: int) -> int:
    """Reader r's pid: in its own read_seq line, written once as it maps the segment."""
    return rseq_word(r) + 1


def round64(n: int) -> int:
    return (n + 63) & ~63


def round_page(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def slot_capacity(buffer_size: int) -> int:
    """Payload bytes one slot holds: ``buffer_size`` plus room for headers and pickle."""
    return round64(buffer_size) + SLOT_SLACK


def segment_size(nreaders: int, slots: int, capacity: int) -> tuple[int, int]:
    """(file size, slot stride) of a ring whose slots hold ``capacity`` payload bytes."""
    stride = SLOT_HDR + round64(capacity)
    return header_size(nreaders, slots) + physical_slots(nreaders, slots) * stride, stride


def create_segment(
    name: str,
    nreaders: int,
    slots: int,
    capacity: int,
    start_seq: int = 0,
    shrink_after: int = SHRINK_AFTER,
    zero_copy_min: int = ZERO_COPY_MIN,
):
    """Create ring ``name`` whose slots hold ``buffer_size``=``capacity`` payload bytes (plus
    slack); the header and the first page of every slot are reserved at once (a full
    /dev/shm fails here, with ShmFullError), the rest of a slot when a message needs it."""
    size, stride = segment_size(nreaders, slots, slot_capacity(capacity))
    hdr = header_size(nreaders, slots)
    nphys = physical_slots(nreaders, slots)
    ranges = [(0, hdr)] + [(hdr + k * stride, RESERVE0) for k in range(nphys)]
    mm = shm.create(name, size, ranges, what=f"channel {channel_of(name)}")
    w = memoryview(mm).cast("q")
    w[W_NSLOTS], w[W_STRIDE], w[W_NREADERS] = slots, stride, nreaders
    w[W_NPHYS], w[W_SHRINK], w[W_ZCMIN] = nphys, shrink_after, zero_copy_min
    w[W_WSEQ] = start_seq
    for r in range(nreaders):
        w[rseq_word(r)] = start_seq
    w[0] = RING_MAGIC
    w.release()
    return mm


def channel_of(name: str) -> str:
    """``dagc-<token>-c3`` (or its big-value segment ``….x5``) -> ``c3``."""
    return name.rsplit("-", 1)[-1].split(".", 1)[0]


# -- big-value segments --------------------------------------------------------------------
def big_header(nreaders: int) -> int:
    return round_page(64 + 8 * nreaders)


def big_size(nreaders: int, capacity: int) -> int:
    return big_header(nreaders) + capacity


def big_name(ring: str, gen: int) -> str:
    return f"{ring}.x{gen}"


def new_big(
    ring: str,
    nreaders: int,
    slot: int,
    capacity: int,
    pid: int,
    value_bytes: int = 0,
    old_gen: int = 0,
):
    """Create and reserve (all of it) a big-value segment of ring ``ring`` under a new name;
    returns (mapping, generation, name). ShmFullError (nothing left behind) when /dev/shm
    cannot hold it.

    The generation is random (never ``old_gen``, the slot's previous one), not a count: a
    name that can be guessed can be created first by anyone on the node. One that exists
    anyway is skipped for the next draw (never adopted: ``shm.create`` is O_EXCL)."""
    for _ in range(NAME_TRIES):
        gen = secrets.randbits(62) + 1
        if gen == old_gen:
            continue
        try:
            return (
                create_big(big_name(ring, gen), nreaders, slot, capacity, pid, value_bytes),
                gen,
                big_name(ring, gen),
            )
        except FileExistsError:
            continue
    raise FileExistsError(
        f"channel {channel_of(ring)}: {NAME_TRIES} random big-value "
        f"segment names in {shm.SHM_DIR} all exist"
    )


def create_big(name: str, nreaders: int, slot: int, capacity: int, pid: int, value_bytes: int = 0):
    """Create and reserve (all of it) big-value segment ``name``; returns its mapping.
    ShmFullError (nothing left behind) when /dev/shm cannot hold it."""
    size = big_size(nreaders, capacity)
    try:
        mm = shm.create(name, size, [(0, size)], what=f"channel {channel_of(name)}")
    except shm.ShmFullError as e:
        # say how big the value was (the reservation is its size plus a page)
        raise shm.full_error(f"channel {channel_of(name)}", e.needed, value_bytes) from None
    w = memoryview(mm).cast("q")
    w[B_CAP], w[B_NREADERS], w[B_WPID], w[B_SLOT] = capacity, nreaders, pid, slot
    w[0] = BIG_MAGIC
    w.release()
    return mm


def big_rpid_word(r: int) -> int:
    return 8 + r

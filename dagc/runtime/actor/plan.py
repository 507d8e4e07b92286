"""What the driver sends an actor: plain, frozen data (plus the user's constants and
communicators, which travel pickled as they are).

:class:`PrepareSpec` is the prepare round's request (only on a node other than the driver's,
or for an actor that writes over TCP); :class:`ActorPlan` is everything one actor needs to
run its part of the DAG, sent once in the start round. Each channel end in a plan is one of
the small records below, keyed by channel id ("c3"); a collective by its group id ("g0").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def tcp_channel_name(token: str, cid: str) -> str:
    """The name both ends of a TCP channel MAC in the handshake (and name their threads by)."""
    return f"{token}:{cid}"


@dataclass(frozen=True)
class RingOut:
    """A shared-memory ring this process writes (or, in a PrepareSpec, creates)."""

    segment: str
    nreaders: int
    slots: int
    capacity: int  # payload bytes per slot to start with


@dataclass(frozen=True)
class RingIn:
    """A shared-memory ring this process reads, as reader number ``index``."""

    segment: str
    index: int
    writer: int  # the writer's control index


@dataclass(frozen=True)
class TcpOut:
    """A TCP channel this actor writes: it listens from the prepare round on."""

    channel: str  # "c3"
    nreaders: int
    slots: int
    readers: tuple  # the readers' control indices
    reader_names: tuple  # their labels, for PeerDied


@dataclass(frozen=True)
class TcpIn:
    """A TCP channel this actor reads: it connects to the writer's address."""

    host: str
    port: int
    index: int  # this actor's reader number
    writer: int  # the writer's control index


@dataclass(frozen=True)
class CommOut:
    """The communicator side of a tensor-transport channel this actor writes."""

    group: str  # the CommGroup id, "k0"
    ranks: Mapping[str, int]  # reader actor id -> its rank in the group
    readers: tuple  # reader actor ids, in the order the schedule sends to them


@dataclass(frozen=True)
class CommIn:
    """The communicator side of a tensor-transport channel this actor reads."""

    group: str
    writer_rank: int


@dataclass(frozen=True)
class Membership:
    """This actor's place in one communicator group."""

    communicator: Any  # an unconfigured dagc.Communicator, set up at start
    rank: int
    world: int
    rendezvous: Any  # what rank 0's prepare() returned


@dataclass(frozen=True)
class CollectiveOp:
    """This actor's part of one collective."""

    group: str  # the CommGroup id
    method: str  # "allreduce.sum", "allgather", ...
    step: int  # its schedule step, for error messages


@dataclass(frozen=True)
class PrepareSpec:
    """Round 1 on one actor: a node's leader creates the node's control segment and the
    rings written on the node; a TCP writer starts listening (``host``)."""

    secret: bytes = field(repr=False)
    host: str = ""
    timeout: float = 60.0
    ctl: str = ""  # the node's control segment, when this actor leads a node
    index: int = -1  # this actor's control index
    nprocs: int = 0  # how many of the DAG's processes run on the node
    segments: tuple = ()  # RingOut: the rings written on the node
    tcp: tuple = ()  # TcpOut: the TCP channels this actor writes


@dataclass(frozen=True)
class ActorPlan:
    """Everything one actor needs to run its part of a compiled DAG."""

    token: str
    prefix: str  # every segment name of the DAG starts with it
    index: int  # this process's control index (driver = 0)
    procs: tuple  # process labels by control index, for error messages
    actor: str  # "a1"
    label: str  # "a1:Stage"
    filename: str  # the generated module's name in tracebacks
    source: str  # the generated module
    constants: tuple = ()  # "#k" -> the user's constant k
    wait: str = "adaptive"
    ctl: str = ""  # this node's control segment
    readers: Mapping[str, RingIn] = field(default_factory=dict)
    writers: Mapping[str, RingOut] = field(default_factory=dict)
    tcp_readers: Mapping[str, TcpIn] = field(default_factory=dict)
    groups: Mapping[str, Membership] = field(default_factory=dict)  # CommGroup id ->
    comm_writers: Mapping[str, CommOut] = field(default_factory=dict)
    comm_readers: Mapping[str, CommIn] = field(default_factory=dict)
    collectives: Mapping[str, CollectiveOp] = field(default_factory=dict)  # group "g0" ->
    devices: Mapping[str, str] = field(default_factory=dict)  # channel id -> "cpu"/"cuda":
    # its tensors move there when read (with_tensor_transport's
    # device=); channels without a hint are not listed
    comm_timeout: float = 60.0
    secret: bytes = field(default=b"", repr=False)  # authenticates TCP channels
    node_cleanup: bool = True  # sweeps stale segments at start, this DAG's at stop: one
    # actor per node without the driver
    node_names: tuple = ()  # this node's segment names (its control's last): the last
    # of the node's processes to map its ends removes them
    # (Control.mark_opened)
    producers: Mapping[str, tuple] = field(default_factory=dict)  # channel id -> (method,
    # step, where) of the op whose value this actor writes
    # there: named when that value cannot be sent

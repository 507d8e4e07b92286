"""TCP channels: the other-node transport, with the shared-memory channel's interface.

``TcpWriter`` / ``TcpReader`` stand wherever ``channel.Writer`` / ``channel.Reader`` stand:
generated loops call ``read()`` and ``write(value)``, the driver ``wait_ready(deadline)``,
``ready()``, ``wake()``/``wake_all()`` and ``close()``. One writer, any number of readers;
every reader gets every message, in order; at most ``slots`` messages are written and not
yet acknowledged by every reader (the window the schedule simulator assumes).

Set-up (the writer listens, readers connect; either may start first)::

    writer process                                 reader process
    w = TcpWriter(chan, nreaders, slots, secret)
    addr = w.listen(node_ip)        # bind + listen now; a thread accepts and authenticates
            ── addr travels through Ray ──▶      r = TcpReader(*addr, secret, index, ...)
                                                   # connects, retrying until connect_timeout
    w.write(v)   # waits (deadline / waiter) until all nreaders are connected

Handshake, before a single byte is unpickled on either side (all fixed-size fields)::

    W → R   b"DAGCTCP1" + nonce_w (32 B)
    R → W   nonce_r (32 B) + reader index (u32)
            + HMAC(secret, "reader", chan, nonce_w, nonce_r, index)
    W       compare_digest; wrong MAC, index out of range or taken → close, nothing sent
    W → R   HMAC(secret, "writer", chan, nonce_r, nonce_w, index)
    R       compare_digest; wrong → close, TcpAuthError

HMAC-SHA256 keyed with the per-compile secret; both sides contribute a fresh nonce, so a
recorded handshake cannot be replayed; the two roles MAC different labels, so a reply
cannot be reflected; the channel name is in the MAC, so a reader cannot be joined to the
wrong channel of the same DAG. This is multiprocessing.connection's deliver_challenge /
answer_challenge, done in both directions with timeouts.

Wire format after the handshake (little-endian)::

    W → R   frame:  kind u8 | 0 u8 | 0 u16 | nbufs u32 | main_len u64 | nbufs × buf_len u64
                    then main_len bytes of pickle (protocol 5), then each out-of-band buffer
                    kind 1 = DATA, 2 = CLOSE (orderly close; no payload),
                    3 = FAIL (payload: the UTF-8 name of a process that died upstream; text,
                    never unpickled — the reader raises PeerDied(name))
    R → W   ack:    u64 = messages this reader has consumed (cumulative);
                    2**64-1 = CLOSE (the reader closed in order)

A frame goes out with one ``sendmsg`` of [header, pickle, buffer, ...] (scatter-gather, no
copy of the payload in user space). When a socket does not take the whole frame at once
(a big payload, a reader busy elsewhere) the unsent rest is queued — out-of-band buffers
copied once, since the caller may reuse its arrays — and a sender thread (started on first
need, asleep in poll() without a timeout otherwise) finishes it. So, as with a shm slot,
write() never waits for a reader to *read* while the window has room: a reader that is
slow to drain one frame cannot hold up the next frame to the other readers (with a
blocking send it could, and two actors could deadlock where the schedule says they can't).

A reader receives small frames through a 256 KiB ring it parses in place; a frame with
out-of-band buffers (or bigger than the ring) is received straight into one new bytearray
laid out like the shm slot (pickle, then each buffer at a 64-byte aligned address): one
copy, kernel to the memory the value then owns. Each read() acks at once (one 8-byte
send): a deferred ack could sit unsent while the reader blocks on another channel, and the
writer waiting for that credit would then wait on a reader that waits on it.

States of message m on connection r::

    unsent      m >= seq                         write() may send it once acked[r] > m - slots
    in flight   m < seq, acked[r] <= m           bytes in socket buffers or the reader's ring
    released    acked[r] > m                     counts toward the window again

Losses: EOF or a socket error on a connection that did not send CLOSE is ``PeerDied(who)``;
a CLOSE (frame or ack) is ``ChannelClosed``; a deadline is ``WaitTimeout``. A peer *host*
that vanishes without a FIN: TCP keepalive (1 s idle, 1 s probes, ``liveness`` = 5 s in
all) catches it on an idle connection, and on the reader's side TCP_USER_TIMEOUT =
``liveness`` catches an ack left unacknowledged. The writer's side sets no user timeout by
default (``stall_timeout``): Linux counts a zero window as a stall even while the peer
answers every probe, so a reader busy in a long method with a big frame pending would be
declared dead; a dead reader host with a frame in flight is noticed by its other peers
(their reader sockets), and the failure reaches the driver through them. A wait sleeps in
poll() for at most ``SLICE`` (0.1 s); every wake-up that delivers nothing calls
``waiter.check(check_peers, deadline)`` when a waiter is given (the DAG-wide teardown
flag, a death seen elsewhere), and ``wake()``/``wake_all()`` interrupt the sleep through a
self-pipe. ``check_peers`` defaults to (): the shm Waiter checks pids, which only mean
something on the waiter's own node. A process whose loop ends because another died closes
its writers with ``close(failed=name)``: their readers raise ``PeerDied(name)`` (a FAIL
frame), so the driver blames the process that died, not the messenger.

Why plain sockets and not pyzmq: the HMAC check must come before any unpickling and in
both directions — zmq's PLAIN sends the password in the clear and CURVE needs libsodium
and a ZAP handler thread; the window must be exactly ``slots`` messages — zmq's high-water
marks are approximate (plus kernel buffers) and PUB drops at the mark; a dead peer must
surface as an error — zmq reconnects silently and needs monitor sockets to even notice;
and a zmq message crosses its I/O thread on both ends. Measured on the 2-core dev box,
loopback, two processes, round trip of a small pickled int (p50): raw blocking sockets
15-19 us, this channel (acks and window included) 38-45 us, a bare pyzmq PAIR 50-70 us.
Most of the gap to raw sockets is the per-message ack: one more send per hop.
Why not ``multiprocessing.connection.Listener/Client(authkey=...)``: its accept() runs the
challenge inline without a timeout (one silent client stalls every reader), Client() does
not retry, and send_bytes takes one buffer per call, so out-of-band buffers would cost a
syscall each or a concatenating copy. The challenge–response idea is kept.

Threads: one thread writes a TcpWriter and one reads a TcpReader (as with the shm
channel); ``wake()``/``wake_all()``/``ready()`` may come from any thread. ``close()`` is
required: it stops the writer's accept and sender threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import pickle
import select
import socket
import struct
import threading
import time
from collections import deque

from dagc.runtime.channel import ChannelClosed, PeerDied, WaitTimeout
from dagc.runtime.serialize import PickleEncoder

HELLO = b"DAGCTCP1"
NONCE = 32
MAC = 32
HDR = struct.Struct("<BBHIQ")             # kind, 0, 0, nbufs, main length
HDR_SIZE = HDR.size                        # 16
KIND_DATA, KIND_CLOSE, KIND_FAIL = 1, 2, 3
MAX_NAME = 4096
ACK = struct.Struct("<Q")
ACK_CLOSE = (1 << 64) - 1
RING = 256 << 10                           # reader ring: frames up to this size are parsed in place
MAX_BUFS = 1 << 24                         # sanity bound on a frame's out-of-band buffer count
IOV_MAX = 512                              # buffers per sendmsg call (the kernel allows 1024)
SLICE = 0.1                                # longest poll sleep between health checks

_monotonic = time.monotonic
_loads = pickle.loads
_dumps = pickle.dumps
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_CLOSE_FRAME = HDR.pack(KIND_CLOSE, 0, 0, 0, 0)
_ACK_CLOSE = ACK.pack(ACK_CLOSE)
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class TcpSetupError(ConnectionError):
    """A TCP channel could not be set up (no writer listening in time, bad address)."""


class TcpAuthError(TcpSetupError):
    """The peer failed the HMAC challenge (wrong secret or channel); nothing was unpickled."""


class TcpProtocolError(ConnectionError):
    """An authenticated peer sent a frame this version cannot parse."""


def new_secret() -> bytes:
    """A per-compile channel secret."""
    return os.urandom(32)


def _mac(secret: bytes, role: bytes, channel: bytes, n1: bytes, n2: bytes, index: int) -> bytes:
    msg = b"".join((b"dagc-tcp\0", role, b"\0", struct.pack("<I", len(channel)), channel,
                    n1, n2, struct.pack("<I", index)))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _check_secret(secret) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("a TCP channel secret must be at least 16 bytes (use tcp.new_secret())")
    return bytes(secret)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Blocking receive of exactly n bytes (handshake only; the socket has a timeout)."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(mv[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def _tune(sock: socket.socket, liveness: float, user_timeout: float | None) -> None:
    """Low latency, and a dead peer host noticed within ``liveness`` seconds when the
    connection is idle (keepalive: 1 s idle, then 1 s probes); ``user_timeout`` bounds how
    long sent data may stay unacknowledged (TCP_USER_TIMEOUT)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(liveness) - idle))
    if user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))


def _again(e: BaseException) -> BaseException:
    """A fresh copy of a sticky end-of-channel error (re-raising one instance grows its
    traceback on every raise)."""
    if isinstance(e, PeerDied):
        return PeerDied(e.who)
    return type(e)(*e.args)


def _proc_name(waiter, proc: int, fallback: str) -> str:
    procs = getattr(waiter, "procs", None)
    if procs is not None and 0 <= proc < len(procs):
        return procs[proc]
    return fallback


def _mark_failed(waiter, proc: int) -> None:
    """Tell this node's other processes (through the control segment) that ``proc`` died."""
    control = getattr(waiter, "control", None)
    if control is not None and proc >= 0:
        try:
            control.fail(proc)
        except Exception:
            pass


class _WakePipe:
    """A self-pipe: ``wake()`` from any thread ends the owner's poll() sleep."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.lock = threading.Lock()

    def wake(self) -> None:
        with self.lock:
            if self.w >= 0:
                try:
                    os.write(self.w, b"\0")
                except OSError:     # full: a wake-up is already pending
                    pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self.lock:
            for fd in (self.r, self.w):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.r = self.w = -1


def _fail_frame(who: str) -> bytes:
    name = who.encode("utf-8", "replace")[:MAX_NAME]
    return HDR.pack(KIND_FAIL, 0, 0, 0, len(name)) + name


def _freeze(parts: list) -> list:
    """The frame as bytes this channel owns: out-of-band buffers (the caller's arrays) are
    copied; the header and the pickle already are ours."""
    return [parts[0], parts[1]] + [bytes(p) for p in parts[2:]]


def _after(parts: list, n: int) -> list:
    """What is left of ``parts`` after the first ``n`` bytes were sent."""
    for i, p in enumerate(parts):
        k = len(p)
        if n < k:
            rest = parts[i:]
            if n:
                rest[0] = memoryview(p)[n:]
            return rest
        n -= k
    return []


class _Conn:
    """The writer's end of one reader's connection."""

    __slots__ = ("sock", "fd", "index", "name", "proc", "acked", "rx", "closed", "queue",
                 "error")

    def __init__(self, sock, index, name, proc):
        self.sock = sock
        self.fd = sock.fileno()
        self.index = index
        self.name = name
        self.proc = proc
        self.acked = 0          # messages this reader consumed
        self.rx = b""           # a partial ack
        self.closed = False     # the reader sent CLOSE
        self.queue = deque()    # bytes written and not yet taken by the kernel, in order
        self.error = None       # a send error the sender thread ran into


class TcpWriter(PickleEncoder):
    """The writing end of a TCP channel: listens; ``nreaders`` readers connect to it.

    ``reader_procs`` are the readers' control indices (names for ``PeerDied`` via
    ``waiter.procs``, and ``waiter.control.fail`` when one is lost); ``reader_names``
    overrides the names. ``check_peers`` goes to ``waiter.check`` (same-node pids only).
    ``stall_timeout`` (s, default off) sets TCP_USER_TIMEOUT on the reader connections.
    """

    on_encode_error = None   # set by actor loops: turns an unpicklable value into a Failure

    def __init__(self, channel: str, nreaders: int, slots: int, secret: bytes, waiter=None,
                 reader_procs: tuple = (), *, reader_names=None, check_peers: tuple = (),
                 connect_timeout: float = 60.0, liveness: float = 5.0,
                 stall_timeout: float | None = None):
        if nreaders < 1 or slots < 1:
            raise ValueError("a TCP channel needs nreaders >= 1 and slots >= 1")
        self.channel = channel
        self._chan = channel.encode()
        self.nreaders = nreaders
        self.slots = slots
        self._secret = _check_secret(secret)
        self.waiter = waiter
        self.reader_procs = tuple(reader_procs)
        names = list(reader_names or ())
        self.reader_names = [
            names[r] if r < len(names) else _proc_name(
                waiter, self.reader_procs[r] if r < len(self.reader_procs) else -1,
                f"reader {r} of channel {channel}")
            for r in range(nreaders)]
        self.check_peers = tuple(check_peers)
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.stall_timeout = stall_timeout
        self.seq = 0
        self.address: tuple | None = None
        self._conns: list[_Conn] = []
        self._taken: set[int] = set()
        self._incoming: list[_Conn] = []
        self._lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(32)
        self._lsock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._connect_deadline = None
        self._closed = False
        self._error: BaseException | None = None
        self._wake = _WakePipe()        # ends the writing thread's waits
        self._kick = _WakePipe()        # wakes the sender thread
        self._sender: threading.Thread | None = None
        self._bufs: list = []
        self._dispatch = None
        self._low = 0           # min acked over all readers, once all are connected
        self._next_drain = 1024

    # -- set-up ----------------------------------------------------------------------------
    def listen(self, host: str = "127.0.0.1", port: int = 0,
               advertise: str | None = None) -> tuple[str, int]:
        """Bind and listen; return the (host, port) readers must connect to."""
        if self._lsock is not None:
            return self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.create_server((host, port), family=family, backlog=max(16, self.nreaders))
        ls.settimeout(0.2)
        self._lsock = ls
        bound = ls.getsockname()
        if advertise is None:
            advertise = bound[0]
            if advertise in ("0.0.0.0", "::"):
                try:
                    advertise = socket.gethostbyname(socket.gethostname())
                except OSError:
                    advertise = "127.0.0.1"
        self.address = (advertise, bound[1])
        self._connect_deadline = _monotonic() + self.connect_timeout
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"dagc-tcp-accept-{self.channel}")
        self._thread.start()
        return self.address

    def _accept_loop(self) -> None:
        ls = self._lsock
        while not self._closed and len(self._taken) < self.nreaders:
            try:
                s, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            if not self._handshakes.acquire(blocking=False):
                s.close()           # a flood of unauthenticated connections: shed it
                continue
            threading.Thread(target=self._handshake, args=(s,), daemon=True,
                             name=f"dagc-tcp-auth-{self.channel}").start()
        with self._lock:
            self._lsock = None
        try:
            ls.close()
        except OSError:
            pass

    def _handshake(self, s: socket.socket) -> None:
        index = -1           # set once this connection owns a reader index
        try:
            s.settimeout(min(10.0, self.connect_timeout))
            nonce_w = os.urandom(NONCE)
            s.sendall(HELLO + nonce_w)
            msg = _recv_exact(s, NONCE + 4 + MAC)
            nonce_r, claimed, proof = (msg[:NONCE], struct.unpack_from("<I", msg, NONCE)[0],
                                       msg[NONCE + 4:])
            want = _mac(self._secret, b"reader", self._chan, nonce_w, nonce_r, claimed)
            if not hmac.compare_digest(proof, want) or not 0 <= claimed < self.nreaders:
                s.close()           # wrong secret or channel: say nothing, unpickle nothing
                return
            with self._lock:
                if self._closed or claimed in self._taken:
                    s.close()
                    return
                self._taken.add(claimed)
                index = claimed
            s.sendall(_mac(self._secret, b"writer", self._chan, nonce_r, nonce_w, index))
            _tune(s, self.liveness, self.stall_timeout)
            s.setblocking(False)
            proc = self.reader_procs[index] if index < len(self.reader_procs) else -1
            conn = _Conn(s, index, self.reader_names[index], proc)
            with self._lock:
                if self._closed:
                    s.close()
                    return
                self._incoming.append(conn)
            self._wake.wake()
        except (OSError, EOFError):
            with self._lock:
                self._taken.discard(index)
            try:
                s.close()
            except OSError:
                pass
        finally:
            self._handshakes.release()
            if len(self._taken) >= self.nreaders:
                ls = self._lsock
                if ls is not None:      # all readers in: stop accepting now
                    try:
                        ls.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _adopt(self) -> None:
        with self._lock:
            new, self._incoming = self._incoming, []
        self._conns.extend(new)
        self._conns.sort(key=lambda c: c.index)
        if len(self._conns) == self.nreaders:
            self._low = min(c.acked for c in self._conns)

    def connected(self) -> int:
        """How many readers have connected and passed the handshake."""
        self._adopt()
        return len(self._conns)

    def wait_connected(self, deadline: float | None = None) -> None:
        """Wait until every reader is connected (write() does this itself)."""
        self._wait_credit(self.seq - self.slots + 1, deadline)

    # -- writing -----------------------------------------------------------------------------
    def write(self, value, deadline: float | None = None) -> None:
        """Send one message to every reader. ``deadline`` bounds the wait for the window
        (and for readers to connect); once a frame is being sent it is sent whole."""
        try:
            main = self._encode(value)
        except Exception as e:
            if self.on_encode_error is None:
                raise
            main = self._encode(self.on_encode_error(e, value))
        seq = self.seq
        if self._low <= seq - self.slots or len(self._conns) < self.nreaders:
            self._wait_credit(seq - self.slots + 1, deadline)
        elif seq >= self._next_drain:
            # a window that never fills never reads acks; keep them from piling up
            self._next_drain = seq + 1024
            for c in self._conns:
                self._drain_acks(c)
        bufs = self._bufs
        if bufs:
            raws = [b.raw() for b in bufs]
            n = len(raws)
            hdr = HDR.pack(KIND_DATA, 0, 0, n, len(main)) + struct.pack(
                f"<{n}Q", *[r.nbytes for r in raws])
            parts = [hdr, main]
            parts.extend(raws)
            bufs.clear()
        else:
            parts = [HDR.pack(KIND_DATA, 0, 0, 0, len(main)), main]
        self._send(parts)
        self.seq = seq + 1

    def _send(self, parts: list) -> None:
        """Hand one frame to every connection: straight to the kernel when its queue is
        empty and the socket takes it all (the common case); otherwise the unsent rest is
        queued, with out-of-band buffers copied once (the caller may reuse its arrays),
        and the sender thread finishes it. So a reader that is slow to read never holds up
        write() inside the window — exactly like a shm slot."""
        total = 0
        for p in parts:
            total += len(p)
        frozen = None
        kick = False
        for c in self._conns:
            if c.error is not None:
                self._lost(c, c.error)
            if c.queue:                 # emptied only by the sender thread, under the lock
                if frozen is None:
                    frozen = _freeze(parts)
                with self._lock:
                    c.queue.extend(frozen)
                kick = True
                continue
            try:
                n = c.sock.sendmsg(parts if len(parts) <= IOV_MAX else parts[:IOV_MAX],
                                   (), _NOSIGNAL)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._lost(c, e)
            if n < total:
                if frozen is None:
                    frozen = _freeze(parts)
                with self._lock:
                    c.queue.extend(_after(frozen, n))
                kick = True
        if kick:
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                                name=f"dagc-tcp-send-{self.channel}")
                self._sender.start()
            self._kick.wake()

    def _break(self, error: BaseException) -> None:
        """Every later write raises ``error`` (through the slow path of write())."""
        self._error = error
        self._low = -(1 << 62)

    def _send_loop(self) -> None:
        """The sender thread: drains queued frames as sockets become writable. Sleeps in
        poll() with no timeout while nothing is queued (an idle channel costs no CPU)."""
        poller = select.poll()
        kick = self._kick.r
        poller.register(kick, _POLLIN)
        conns = list(self._conns)
        byfd = {c.fd: c for c in conns}
        watched: set = set()
        while not self._closed:
            busy = {c.fd for c in conns if c.queue and c.error is None}
            for fd in watched - busy:
                poller.unregister(fd)
            for fd in busy - watched:
                poller.register(fd, _POLLOUT)
            watched = busy
            events = poller.poll(1000 if busy else None)
            for fd, ev in events:
                if fd == kick:
                    self._kick.drain()
                    continue
                c = byfd[fd]
                with self._lock:
                    if self._closed or not c.queue:
                        continue
                    q = c.queue
                    try:
                        n = c.sock.sendmsg([q[i] for i in range(min(len(q), IOV_MAX))],
                                           (), _NOSIGNAL)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        c.error = e             # the writer's thread decides what it means
                        q.clear()
                        self._wake.wake()
                        continue
                    while n:
                        k = len(q[0])
                        if n < k:
                            q[0] = memoryview(q[0])[n:]
                            break
                        q.popleft()
                        n -= k

    def _drain_acks(self, c: _Conn) -> None:
        """Read whatever acks reader ``c`` has sent (non-blocking)."""
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(c, e)
        if not data:
            self._lost(c, None)
        if c.rx:
            data = c.rx + data
        k = len(data) & ~7
        c.rx = data[k:]
        if k:
            v = ACK.unpack_from(data, k - 8)[0]
            if v == ACK_CLOSE:
                c.closed = True
                raise ChannelClosed()
            if v > c.acked:
                c.acked = v

    def _wait_credit(self, low: int, deadline: float | None) -> None:
        """Return once every reader is connected and has acked message ``low - 1``."""
        if self._error is not None:
            raise _again(self._error)
        if self._closed:
            raise ChannelClosed()
        poller = None
        nfds = -1
        while True:
            if len(self._conns) < self.nreaders:
                self._adopt()
            if len(self._conns) == self.nreaders:
                for c in self._conns:
                    if c.error is not None:
                        self._lost(c, c.error)
                    if c.acked < low:
                        self._drain_acks(c)
                self._low = m = min(c.acked for c in self._conns)
                if m >= low:
                    return
            if self._closed:
                raise ChannelClosed()
            now = _monotonic()
            if len(self._conns) < self.nreaders and self._connect_deadline is not None \
                    and now > self._connect_deadline:
                missing = sorted(set(range(self.nreaders)) - {c.index for c in self._conns})
                self._break(PeerDied(self.reader_names[missing[0]]))
                raise self._error
            if deadline is not None and now >= deadline:
                if self.waiter is not None:
                    self.waiter.check(self.check_peers, deadline)
                raise WaitTimeout()
            if poller is None or nfds != len(self._conns):
                poller = select.poll()
                poller.register(self._wake.r, _POLLIN)
                for c in self._conns:
                    poller.register(c.fd, _POLLIN)
                nfds = len(self._conns)
            t = SLICE if deadline is None else max(0.0, min(SLICE, deadline - now))
            events = poller.poll(t * 1000)
            woke = not events
            for fd, _ in events:
                if fd == self._wake.r:
                    self._wake.drain()
                    woke = True
            if woke and self.waiter is not None:
                self.waiter.check(self.check_peers, deadline)

    def _lost(self, c: _Conn, exc) -> None:
        if c.closed:
            raise ChannelClosed()
        # an orderly CLOSE may still sit in the socket ahead of the error
        try:
            data = c.rx + c.sock.recv(65536)
            k = len(data) & ~7
            if k and data[k - 8:k] == _ACK_CLOSE:
                c.closed = True
                raise ChannelClosed()
        except OSError:
            pass
        if self._closed:
            raise ChannelClosed()
        _mark_failed(self.waiter, c.proc)
        self._break(PeerDied(c.name))
        raise self._error

    def wake_all(self) -> None:
        """End a wait in write() now (it then consults the waiter)."""
        self._wake.wake()

    def close(self, abort: bool = False, failed: str | None = None) -> None:
        """Close every connection. Readers see ChannelClosed; with ``failed`` (the name of
        a process whose death ended this writer's loop) PeerDied(failed), so the right
        process is blamed downstream; with ``abort`` PeerDied(this writer). Bounded: a
        connection with frames still queued (its reader stopped reading) is cut, so its
        reader sees PeerDied(this writer) unless its own teardown reached it first."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._break(ChannelClosed())
            conns = self._conns + self._incoming
            self._conns, self._incoming = [], []
            ls = self._lsock
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._kick.wake()
        if self._sender is not None and self._sender is not threading.current_thread():
            self._sender.join(1.0)
        for c in conns:
            try:
                if not abort and not c.queue:
                    c.sock.send(_CLOSE_FRAME if failed is None else _fail_frame(failed),
                                _NOSIGNAL | _DONTWAIT)
                c.sock.shutdown(socket.SHUT_WR)
                c.sock.recv(65536)     # unread acks would turn our FIN into a reset
            except OSError:
                pass
            try:
                c.sock.close()
            except OSError:
                pass
        self._wake.wake()        # the pipes themselves close with this object (no fd reuse race)

    def __del__(self):
        for pipe in (getattr(self, "_wake", None), getattr(self, "_kick", None)):
            if pipe is not None:
                pipe.close()

    def __repr__(self) -> str:
        return (f"<TcpWriter {self.channel} {self.address} {len(self._conns)}/{self.nreaders} "
                f"readers, seq {self.seq}>")


class TcpReader:
    """The reading end of a TCP channel for reader number ``index``.

    Connects (and authenticates) in the constructor, retrying until ``connect_timeout``;
    ``connect=False`` defers that to ``connect()``. ``writer_proc`` is the writer's
    control index (its name for ``PeerDied`` via ``waiter.procs``).
    """

    def __init__(self, host: str, port: int, secret: bytes, index: int = 0, waiter=None,
                 writer_proc: int = -1, *, channel: str = "", writer_name: str | None = None,
                 check_peers: tuple = (), connect_timeout: float = 60.0,
                 liveness: float = 5.0, connect: bool = True):
        self.host, self.port = host, int(port)
        self.channel = channel
        self._chan = channel.encode()
        self._secret = _check_secret(secret)
        self.index = index
        self.waiter = waiter
        self.writer_proc = writer_proc
        self.writer_name = writer_name or _proc_name(
            waiter, writer_proc, f"writer of channel {channel} at {host}:{port}")
        self.check_peers = tuple(check_peers)
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.seq = 0
        self.sock: socket.socket | None = None
        self._wake = _WakePipe()
        self._buf = bytearray(RING)
        self._mv = memoryview(self._buf)
        self._lo = self._hi = 0       # unparsed bytes are _buf[_lo:_hi]
        self._big = None              # [blob, targets, target, filled, pickle span, buffers]
        self._msg = None              # a complete message not yet read
        self._eof = False
        self._drained = True
        self._end: BaseException | None = None
        self._ack_out = b""
        self._closed = False
        self._rlock = threading.Lock()   # read() vs ready() from another thread
        if connect:
            self.connect()

    # -- set-up ----------------------------------------------------------------------------
    def connect(self, deadline: float | None = None) -> None:
        """Connect and authenticate, retrying refused/unreachable until the deadline."""
        if self.sock is not None:
            return
        if deadline is None:
            deadline = _monotonic() + self.connect_timeout
        pause = 0.01
        last = None
        while True:
            if self._closed:
                raise ChannelClosed()
            left = deadline - _monotonic()
            if left <= 0:
                raise TcpSetupError(
                    f"could not connect to the writer of channel {self.channel!r} at "
                    f"{self.host}:{self.port} within {self.connect_timeout:g} s ({last}); "
                    f"is its process alive and the port reachable from this node?")
            try:
                s = socket.create_connection((self.host, self.port), timeout=min(left, 2.0))
            except OSError as e:           # refused, unreachable, timed out: retry
                last = e
                s = None
            if s is not None:
                try:
                    s.settimeout(min(max(left, 0.1), 10.0))
                    self._authenticate(s)
                    break
                except _Retry as e:
                    last = e.__cause__ or e
                    s.close()
                except BaseException:
                    s.close()
                    raise
            if self.waiter is not None:
                try:
                    self.waiter.check(self.check_peers, None)
                except WaitTimeout:
                    pass
            time.sleep(min(pause, max(0.0, deadline - _monotonic())))
            pause = min(pause * 2, 0.25)
        _tune(s, self.liveness, self.liveness)
        s.setblocking(False)
        self.sock = s
        self._fd = s.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, _POLLIN)
        self._poller.register(self._wake.r, _POLLIN)

    def _authenticate(self, s: socket.socket) -> None:
        try:
            hello = _recv_exact(s, len(HELLO) + NONCE)
        except (EOFError, OSError) as e:    # the writer shed us before its hello: retry
            raise _Retry() from e
        if hello[:len(HELLO)] != HELLO:
            raise TcpAuthError(f"{self.host}:{self.port} is not a dagc TCP channel writer")
        nonce_w = hello[len(HELLO):]
        nonce_r = os.urandom(NONCE)
        s.sendall(nonce_r + struct.pack("<I", self.index)
                  + _mac(self._secret, b"reader", self._chan, nonce_w, nonce_r, self.index))
        try:
            proof = _recv_exact(s, MAC)
        except (EOFError, OSError):
            raise TcpAuthError(
                f"the writer of channel {self.channel!r} at {self.host}:{self.port} rejected "
                f"reader {self.index} (wrong secret or channel, or the index is taken)") from None
        want = _mac(self._secret, b"writer", self._chan, nonce_r, nonce_w, self.index)
        if not hmac.compare_digest(proof, want):
            raise TcpAuthError(
                f"the peer at {self.host}:{self.port} failed authentication for channel "
                f"{self.channel!r}; nothing it sent was unpickled")

    # -- receiving ---------------------------------------------------------------------------
    def _fill(self) -> bool:
        """One non-blocking recv into the ring or the frame being received; False: nothing.
        ``_drained`` notes a short recv: the socket is likely empty, so poll first."""
        big = self._big
        try:
            if big is not None:
                t = big[1][big[2]][big[3]:]
                want = len(t)
                n = self.sock.recv_into(t)
            else:
                if self._hi == len(self._buf):
                    self._compact(len(self._buf) + (RING if self._lo == 0 else 0))
                want = len(self._buf) - self._hi
                n = self.sock.recv_into(self._mv[self._hi:])
        except (BlockingIOError, InterruptedError):
            self._drained = True
            return False
        except OSError:
            n = 0
        if not n:
            self._eof = True
            return False
        self._drained = n < want
        if big is not None:
            big[3] += n
            self._advance_big()
        else:
            self._hi += n
        return True

    def _compact(self, need: int) -> None:
        """Move unparsed bytes to the front; grow the ring if ``need`` bytes will not fit."""
        lo, hi = self._lo, self._hi
        if need > len(self._buf):
            buf = bytearray(need)
            buf[:hi - lo] = self._mv[lo:hi]
            self._buf, self._mv = buf, memoryview(buf)
        elif lo:
            self._mv[:hi - lo] = self._mv[lo:hi]
        self._lo, self._hi = 0, hi - lo

    def _advance_big(self) -> None:
        big = self._big
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
                return PeerDied(bytes(self._mv[lo + HDR_SIZE:lo + HDR_SIZE + mlen])
                                .decode("utf-8", "replace"))
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
            blob = bytearray(size + 64)
            c = ctypes.c_char.from_buffer(blob)
            shift = -ctypes.addressof(c) & 63       # put the buffers on 64-byte boundaries
            del c
            offs = [o + shift for o in offs]
        else:
            blob = bytearray(size)
            shift = 0
        bv = memoryview(blob)
        targets = [bv[shift:shift + mlen]]
        targets.extend(bv[o:o + ln] for o, ln in zip(offs, lens))
        targets = [t for t in targets if len(t)]
        # what the ring already holds of this frame
        p = lo + hlen
        hi = self._hi
        ti = 0
        filled = 0
        while ti < len(targets) and p < hi:
            t = targets[ti]
            k = min(len(t) - filled, hi - p)
            t[filled:filled + k] = self._mv[p:p + k]
            p += k
            filled += k
            if filled == len(t):
                ti += 1
                filled = 0
        self._lo = p
        if p == hi:
            self._lo = self._hi = 0
        parts = [bv[o:o + ln] for o, ln in zip(offs, lens)]
        msg = [blob, targets, ti, filled, (shift, shift + mlen), parts]
        if ti < len(targets):
            self._big = msg
            return None
        return msg

    def _next(self, deadline):
        """Wait for a complete message (the next frame, or KIND_CLOSE)."""
        m = self._msg
        if m is not None:
            return m
        if self._end is not None:
            raise _again(self._end)
        if self._closed:
            raise ChannelClosed()
        if self.sock is None:
            self.connect()
        poll = self._poller.poll
        while True:
            m = self._parse()
            if m is not None:
                self._msg = m
                return m
            if not self._drained and self._fill():
                continue
            if self._eof:
                m = self._parse()
                if m is not None:
                    self._msg = m
                    return m
                self._lost()
            if self._ack_out:
                self._send_ack(b"")
            if deadline is None:
                t = SLICE * 1000
            else:
                left = deadline - _monotonic()
                if left <= 0:
                    if self.waiter is not None:
                        self.waiter.check(self.check_peers, deadline)
                    raise WaitTimeout()
                t = min(SLICE, left) * 1000
            events = poll(t)
            woke = not events
            for fd, _ in events:
                if fd == self._fd:
                    self._drained = False
                else:
                    self._wake.drain()
                    woke = True
            if self._closed:
                raise ChannelClosed()
            if woke and self.waiter is not None:
                self.waiter.check(self.check_peers, deadline)

    def _lost(self):
        if self._closed:
            raise ChannelClosed()
        _mark_failed(self.waiter, self.writer_proc)
        self._end = PeerDied(self.writer_name)
        raise self._end

    def ready(self) -> bool:
        """True when read() will not block: a message is there (or the channel ended).
        Safe to call from any thread (while another thread reads it says False)."""
        if self._msg is not None or self._end is not None:
            return True
        if not self._rlock.acquire(False):
            return False
        try:
            return self._ready()
        finally:
            self._rlock.release()

    def _ready(self) -> bool:
        if self.sock is None or self._closed:
            return self._closed
        m = self._parse()
        while m is None and self._fill():
            m = self._parse()
        if m is None and self._eof:
            m = self._parse()
            if m is None:
                return True
        self._msg = m
        return m is not None

    def wait_ready(self, deadline: float | None = None) -> None:
        """Wait until a whole message is there, without consuming it."""
        if self._msg is None:
            with self._rlock:
                self._next(deadline)

    def read(self, deadline: float | None = None):
        with self._rlock:
            return self._read(deadline)

    def _read(self, deadline):
        m = self._msg
        if m is None:
            m = self._next(deadline)
        self._msg = None
        if m.__class__ is tuple:
            value = _loads(self._mv[m[0]:m[1]])
            if self._lo == self._hi:
                self._lo = self._hi = 0
        elif m.__class__ is list:
            blob, _, _, _, (start, end), parts = m
            if parts:
                value = _loads(memoryview(blob)[start:end], buffers=parts)
            else:
                value = _loads(blob)
        elif m.__class__ is PeerDied:  # FAIL: the writer passes on a death it saw
            procs = getattr(self.waiter, "procs", None) or ()
            _mark_failed(self.waiter, procs.index(m.who) if m.who in procs else -1)
            self._end = m
            raise _again(m)
        else:                       # KIND_CLOSE
            self._end = ChannelClosed()
            raise _again(self._end)
        self.seq = seq = self.seq + 1
        self._send_ack(ACK.pack(seq))
        return value

    def _send_ack(self, ack: bytes) -> None:
        """Send ``ack`` (b"": just flush). Acks are cumulative, so of several unsent whole
        acks only the newest goes out; a partly sent one is finished first."""
        out = self._ack_out
        if out:
            part = len(out) % 8
            data = out[:part] + (ack or out[part:])
        else:
            data = ack
        if not data:
            return
        try:
            n = self.sock.send(data, _NOSIGNAL)
        except BlockingIOError:
            n = 0
        except OSError:             # the writer is gone; the next wait says so
            self._ack_out = b""
            return
        self._ack_out = data[n:]

    def wake(self) -> None:
        """End a wait in read()/wait_ready() now (it then consults the waiter)."""
        self._wake.wake()

    def close(self, abort: bool = False) -> None:
        """Close the connection; the writer sees ChannelClosed (``abort``: PeerDied)."""
        if self._closed:
            return
        self._closed = True
        s = self.sock
        if s is not None:
            try:
                if not abort:
                    s.send(self._ack_out + _ACK_CLOSE, _NOSIGNAL | _DONTWAIT)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._wake.wake()        # the pipe itself closes with this object (no fd reuse race)

    def __del__(self):
        pipe = getattr(self, "_wake", None)
        if pipe is not None:
            pipe.close()

    def __repr__(self) -> str:
        return (f"<TcpReader {self.channel} #{self.index} <- {self.host}:{self.port}, "
                f"seq {self.seq}>")


class _Retry(Exception):
    """Internal: this connection attempt failed in a way worth retrying."""

"""The writing end of a TCP channel: listens, authenticates readers, sends frames.

See docs/tcp.md for the protocol and the states of a message; ``accept.py`` accepts and
authenticates the readers, ``sender.py`` is the sender thread and takes the acks, ``tls.py``
has the TLS variants of the per-message methods.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

from dagc.runtime.channels.control import ChannelClosed, PeerDied, WaitTimeout
from dagc.runtime.channels.serialize import PickleEncoder
from dagc.runtime.channels.tcp import sender
from dagc.runtime.channels.tcp.accept import Acceptor, Conn
from dagc.runtime.channels.tcp.tls import FROM_ENV, WriterTls, resolve_tls, tls_context, tls_send
from dagc.runtime.channels.tcp.wire import (
    CLOSE_ACK,
    CLOSE_FRAME,
    DONTWAIT,
    HDR,
    IOV_MAX,
    KIND_DATA,
    NOSIGNAL,
    SLICE,
    WakePipe,
    after,
    again,
    check_secret,
    fail_frame,
    freeze,
    freeze_rest,
    mark_failed,
    proc_name,
)

_monotonic = time.monotonic
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
# A frame with this much left after the first sendmsg is sent on from the caller's buffers
# while the reader takes it (``_send_inline``), not copied into the queue.
INLINE_MIN = 256 << 10
# How long the socket may make no progress, per byte left, before the rest is copied and
# queued instead: about what copying it costs (~0.5 ns/byte), so waiting never costs more.
STALL_NS_PER_BYTE = 0.5


class TcpWriter(WriterTls, PickleEncoder):
    """The writing end of a TCP channel: listens; ``nreaders`` readers connect to it.

    ``reader_procs`` are the readers' control indices (names for ``PeerDied`` via
    ``waiter.procs``, and ``waiter.control.fail`` when one is lost); ``reader_names``
    overrides the names. ``check_peers`` goes to ``waiter.check`` (same-node pids only).
    ``stall_timeout`` (s, default off) sets TCP_USER_TIMEOUT on the reader connections.
    ``tls``: ``FROM_ENV`` (default) uses TLS exactly when Ray does (``RAY_USE_TLS``, with
    Ray's certificate files), None plain TCP, a (cert, key, ca) tuple those files; readers
    must be made alike. See docs/tcp.md, "TLS".
    """

    def __init__(
        self,
        channel: str,
        nreaders: int,
        slots: int,
        secret: bytes,
        waiter=None,
        reader_procs: tuple = (),
        *,
        reader_names=None,
        check_peers: tuple = (),
        connect_timeout: float = 60.0,
        liveness: float = 5.0,
        stall_timeout: float | None = None,
        tls=FROM_ENV,
    ):
        if nreaders < 1 or slots < 1:
            raise ValueError("a TCP channel needs nreaders >= 1 and slots >= 1")
        self.tls = resolve_tls(tls)
        self._ctx = None
        if self.tls is not None:
            # TLS: the same frames inside TLS records. The socket calls differ (no
            # sendmsg, "want read/write" instead of EAGAIN, one TLS object that two threads
            # must not use at once), so a TLS writer binds the TLS variants of its two
            # per-message methods here; the plain path runs exactly the code it always did
            self._ctx = tls_context(self.tls, server_side=True)
            self._send = self._send_tls  # type: ignore[method-assign]
            self._drain_acks = self._drain_acks_tls  # type: ignore[method-assign]
        self.channel = channel
        self.nreaders = nreaders
        self.slots = slots
        self._secret = check_secret(secret)
        self.waiter = waiter
        self.reader_procs = tuple(reader_procs)
        names = list(reader_names or ())
        self.reader_names = [
            names[r]
            if r < len(names)
            else proc_name(
                waiter,
                self.reader_procs[r] if r < len(self.reader_procs) else -1,
                f"reader {r} of channel {channel}",
            )
            for r in range(nreaders)
        ]
        self.check_peers = tuple(check_peers)
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.stall_timeout = stall_timeout
        self.seq = 0
        self.address: tuple[str, int] | None = None
        self._conns: list[Conn] = []
        self._lock = threading.Lock()
        self._connect_deadline: float | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._wake = WakePipe()  # ends the writing thread's waits
        self._kick = WakePipe()  # wakes the sender thread
        self._acceptor = Acceptor(
            channel,
            nreaders,
            self._secret,
            self._ctx,
            self.reader_procs,
            self.reader_names,
            connect_timeout,
            liveness,
            stall_timeout,
            self._wake.wake,
        )
        self._sender: threading.Thread | None = None
        self._bufs: list = []
        self._dispatch = None
        self._low = 0  # min acked over all readers, once all are connected
        self._next_drain = 1024

    # -- set-up ----------------------------------------------------------------------------
    def listen(
        self, host: str = "127.0.0.1", port: int = 0, advertise: str | None = None
    ) -> tuple[str, int]:
        """Bind and listen; return the (host, port) readers must connect to."""
        if self._acceptor.listening() and self.address is not None:
            return self.address
        self.address = self._acceptor.listen(host, port, advertise)
        self._connect_deadline = _monotonic() + self.connect_timeout
        return self.address

    def _adopt(self) -> None:
        self._conns.extend(self._acceptor.take())
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
    def write(self, value, deadline: float | None = None) -> bool | None:
        """Send one message to every reader. ``deadline`` bounds the wait for the window
        (and for readers to connect); once a frame is being sent it is sent whole.
        Returns True when ``value`` could not be pickled and ``on_encode_error``'s stand-in
        was sent instead (None otherwise)."""
        try:
            main = self._encode(value)
        except Exception as e:
            return self._write_instead(e, value, deadline)
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
                f"<{n}Q", *[r.nbytes for r in raws]
            )
            parts = [hdr, main]
            parts.extend(raws)
            bufs.clear()
        else:
            parts = [HDR.pack(KIND_DATA, 0, 0, 0, len(main)), main]
        self._send(parts)
        self.seq = seq + 1
        return None  # sent (the same bytecode as falling off the end)

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
            if c.queue:  # emptied only by the sender thread, under the lock
                if frozen is None:
                    frozen = freeze(parts)
                with self._lock:
                    c.queue.extend(frozen)
                kick = True
                continue
            try:
                n = c.sock.sendmsg(
                    parts if len(parts) <= IOV_MAX else parts[:IOV_MAX], (), NOSIGNAL
                )
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._lost(c, e)
            if n < total and total - n >= INLINE_MIN:
                n = self._send_inline(c, parts, n, total)
            if n < total:
                with self._lock:
                    c.queue.extend(freeze_rest(parts, n))
                kick = True
        if kick:
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, daemon=True, name=f"dagc-tcp-send-{self.channel}"
                )
                self._sender.start()
            self._kick.wake()

    def _send_inline(self, c: Conn, parts: list, n: int, total: int) -> int:
        """Send the rest of a big frame from the caller's own buffers (no copy) while the
        reader keeps taking it; returns the bytes sent. Gives up — the caller then copies
        what is left and queues it — once the socket made no progress for as long as that
        copy would take (``STALL_NS_PER_BYTE``): a reader busy elsewhere (or a peer writing
        a big frame to us at the same time) never holds write() up for more than a copy."""
        poller = select.poll()
        poller.register(c.fd, _POLLOUT)
        rest = after(parts, n)
        sock = c.sock
        while n < total:
            stall_ms = max(1.0, (total - n) * STALL_NS_PER_BYTE / 1e6)
            if not poller.poll(stall_ms) or self._closed:
                return n
            try:
                k = sock.sendmsg(rest if len(rest) <= IOV_MAX else rest[:IOV_MAX], (), NOSIGNAL)
            except BlockingIOError:
                continue
            except OSError as e:
                self._lost(c, e)
            n += k
            rest = after(rest, k)
        return n

    def _break(self, error: BaseException) -> None:
        """Every later write raises ``error`` (through the slow path of write())."""
        self._error = error
        self._low = -(1 << 62)

    def _send_loop(self) -> None:
        sender.send_loop(self)  # the sender thread's body

    def _drain_acks(self, c: Conn) -> None:
        """Read whatever acks reader ``c`` has sent (non-blocking)."""
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(c, e)
        if not data:
            self._lost(c, None)
        self._take_acks(c, data)

    _take_acks = staticmethod(sender.take_acks)

    def _wait_credit(self, low: int, deadline: float | None) -> None:
        """Return once every reader is connected and has acked message ``low - 1``."""
        if self._error is not None:
            raise again(self._error)
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
            if (
                len(self._conns) < self.nreaders
                and self._connect_deadline is not None
                and now > self._connect_deadline
            ):
                missing = sorted(set(range(self.nreaders)) - {c.index for c in self._conns})
                err = PeerDied(self.reader_names[missing[0]])
                self._break(err)
                raise err
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

    def _lost(self, c: Conn, exc) -> None:
        if c.closed:
            raise ChannelClosed()
        # an orderly CLOSE may still sit in the socket ahead of the error
        try:
            data = c.rx + c.sock.recv(65536)
            k = len(data) & ~7
            if k and data[k - 8 : k] == CLOSE_ACK:
                c.closed = True
                raise ChannelClosed()
        except OSError:
            pass
        if self._closed:
            raise ChannelClosed()
        mark_failed(self.waiter, c.proc)
        err = PeerDied(c.name)
        self._break(err)
        raise err

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
            conns, self._conns = self._conns, []
        conns += self._acceptor.close()  # connections it authenticated and we never took
        self._kick.wake()
        if self._sender is not None and self._sender is not threading.current_thread():
            self._sender.join(1.0)
        for c in conns:
            frame = (
                None
                if abort or c.queue
                else (CLOSE_FRAME if failed is None else fail_frame(failed))
            )
            try:
                if self._ctx is not None:
                    with self._lock:  # the writing thread may be reading acks
                        if frame is not None:
                            tls_send(c.sock, [frame])
                        c.sock.shutdown(socket.SHUT_WR)  # drops TLS: the rest is raw
                else:
                    if frame is not None:
                        c.sock.send(frame, NOSIGNAL | DONTWAIT)
                    c.sock.shutdown(socket.SHUT_WR)
                c.sock.recv(65536)  # unread acks would turn our FIN into a reset
            except OSError:
                pass
            try:
                c.sock.close()
            except OSError:
                pass
        self._wake.wake()  # the pipes themselves close with this object (no fd reuse race)

    def __del__(self):
        for pipe in (getattr(self, "_wake", None), getattr(self, "_kick", None)):
            if pipe is not None:
                pipe.close()

    def __repr__(self) -> str:
        return (
            f"<TcpWriter {self.channel} {self.address} {len(self._conns)}/{self.nreaders} "
            f"readers, seq {self.seq}>"
        )

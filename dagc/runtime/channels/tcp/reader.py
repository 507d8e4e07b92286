"""The reading end of a TCP channel: connects, authenticates, parses frames, acks.

See docs/tcp.md for the protocol and the states of a message; ``handshake.py`` has the
reader's half of the handshake, ``frames.py`` the parsing of frames, ``tls.py`` the TLS
variants of the per-message methods.
"""

from __future__ import annotations

import pickle
import select
import socket
import threading
import time

from dagc.runtime.channels.control import ChannelClosed, PeerDied, WaitTimeout
from dagc.runtime.channels.serialize import undecodable
from dagc.runtime.channels.tcp import handshake
from dagc.runtime.channels.tcp.buffers import FrameBuffers
from dagc.runtime.channels.tcp.frames import Frames
from dagc.runtime.channels.tcp.tls import FROM_ENV, ReaderTls, resolve_tls, tls_context
from dagc.runtime.channels.tcp.wire import (
    ACK,
    CLOSE_ACK,
    DONTWAIT,
    NOSIGNAL,
    RING,
    SLICE,
    Retry,
    TcpSetupError,
    WakePipe,
    again,
    check_secret,
    mark_failed,
    proc_name,
    tune_socket,
)

_monotonic = time.monotonic
_loads = pickle.loads
_POLLIN = select.POLLIN


class TcpReader(ReaderTls, Frames):
    """The reading end of a TCP channel for reader number ``index``.

    Connects (and authenticates) in the constructor, retrying until ``connect_timeout``;
    ``connect=False`` defers that to ``connect()``. ``writer_proc`` is the writer's
    control index (its name for ``PeerDied`` via ``waiter.procs``). ``tls`` as for
    ``TcpWriter`` (default: TLS exactly when Ray uses it).
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        index: int = 0,
        waiter=None,
        writer_proc: int = -1,
        *,
        channel: str = "",
        writer_name: str | None = None,
        check_peers: tuple = (),
        connect_timeout: float = 60.0,
        liveness: float = 5.0,
        connect: bool = True,
        tls=FROM_ENV,
    ):
        self.tls = resolve_tls(tls)
        self._ctx = None
        if self.tls is not None:
            # the TLS variants of the per-message socket calls (see TcpWriter.__init__)
            self._ctx = tls_context(self.tls, server_side=False)
            self._fill = self._fill_tls  # type: ignore[method-assign]
            self._send_ack = self._send_ack_tls  # type: ignore[method-assign]
            self._ack_new = b""
        self.host, self.port = host, int(port)
        self.channel = channel
        self._secret = check_secret(secret)
        self.index = index
        self.waiter = waiter
        self.writer_proc = writer_proc
        self.writer_name = writer_name or proc_name(
            waiter, writer_proc, f"writer of channel {channel} at {host}:{port}"
        )
        self.check_peers = tuple(check_peers)
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.seq = 0
        # set by connect(), before any read (the reads take it as set: no check per call)
        self.sock: socket.socket = None  # type: ignore[assignment]
        self._wake = WakePipe()
        self._buf = bytearray(RING)
        self._mv = memoryview(self._buf)
        self._lo = self._hi = 0  # unparsed bytes are _buf[_lo:_hi]
        # [blob, targets, target, filled, pickle span, buffers] of a big frame being received
        self._big: list | None = None
        self._msg = None  # a complete message not yet read
        self._buffers = FrameBuffers()  # where frames with out-of-band buffers go
        self._eof = False
        self._drained = True
        self._end: BaseException | None = None
        self._ack_out = b""
        self._closed = False
        self._rlock = threading.Lock()  # read() vs ready() from another thread
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
                tls = (
                    ""
                    if self._ctx is not None
                    else (
                        ", and is this end's RAY_USE_TLS the writer's (a TLS writer never "
                        "answers a plain reader)"
                    )
                )
                raise TcpSetupError(
                    f"could not connect to the writer of channel {self.channel!r} at "
                    f"{self.host}:{self.port} within {self.connect_timeout:g} s ({last}); "
                    f"is its process alive and the port reachable from this node{tls}?"
                )
            try:
                s = handshake.dial(
                    self.host, self.port, left, self._ctx, self._secret, self.channel, self.index
                )
                break
            except Retry as e:  # refused, unreachable, timed out, shed: retry
                last = e.__cause__ or e
            if self.waiter is not None:
                try:
                    self.waiter.check(self.check_peers, None)
                except WaitTimeout:
                    pass
            time.sleep(min(pause, max(0.0, deadline - _monotonic())))
            pause = min(pause * 2, 0.25)
        tune_socket(s, self.liveness, self.liveness)
        s.setblocking(False)
        self.sock = s
        self._fd = s.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, _POLLIN)
        self._poller.register(self._wake.r, _POLLIN)

    # -- receiving ---------------------------------------------------------------------------
    def _fill(self) -> bool:
        """One non-blocking recv into the ring or the frame being received; False: nothing.
        ``_drained`` notes a short recv: the socket is likely empty, so poll first."""
        big = self._big
        try:
            if big is not None:
                t = big[1][big[2]][big[3] :]
                want = len(t)
                n = self.sock.recv_into(t)
            else:
                if self._hi == len(self._buf):
                    self._compact(len(self._buf) + (RING if self._lo == 0 else 0))
                want = len(self._buf) - self._hi
                n = self.sock.recv_into(self._mv[self._hi :])
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
            self._advance_big(big)
        else:
            self._hi += n
        return True

    def _next(self, deadline):
        """Wait for a complete message (the next frame, or KIND_CLOSE)."""
        m = self._msg
        if m is not None:
            return m
        if self._end is not None:
            raise again(self._end)
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
        mark_failed(self.waiter, self.writer_proc)
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

    def _undecodable(self, exc: Exception):
        """The Failure passed on in place of a message this end (or a comm reader over
        it, ``comm/p2p.py``) consumed but could not decode."""
        return undecodable(exc, self.writer_name, self.channel)

    def _read(self, deadline):
        m = self._msg
        if m is None:
            m = self._next(deadline)
        self._msg = None
        if m.__class__ is tuple:
            try:
                value = _loads(self._mv[m[0] : m[1]])
            except Exception as e:  # consumed and acked all the same: the DAG goes on
                value = self._undecodable(e)
            if self._lo == self._hi:
                self._lo = self._hi = 0
        elif m.__class__ is list:
            blob, _, _, _, (start, end), parts = m
            try:
                if parts:
                    value = _loads(memoryview(blob)[start:end], buffers=parts)
                else:
                    value = _loads(blob)
            except Exception as e:  # as above
                value = self._undecodable(e)
        elif m.__class__ is PeerDied:  # FAIL: the writer passes on a death it saw
            procs = getattr(self.waiter, "procs", None) or ()
            mark_failed(self.waiter, procs.index(m.who) if m.who in procs else -1)
            self._end = m
            raise again(m)
        else:  # KIND_CLOSE
            self._end = ChannelClosed()
            raise again(self._end)
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
            n = self.sock.send(data, NOSIGNAL)
        except BlockingIOError:
            n = 0
        except OSError:  # the writer is gone; the next wait says so
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
        self._buffers.close()
        s = self.sock
        if s is not None and self._ctx is not None:
            self._close_tls(s, abort)
        elif s is not None:
            try:
                if not abort:
                    s.send(self._ack_out + CLOSE_ACK, NOSIGNAL | DONTWAIT)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._wake.wake()  # the pipe itself closes with this object (no fd reuse race)

    def __del__(self):
        pipe = getattr(self, "_wake", None)
        if pipe is not None:
            pipe.close()

    def __repr__(self) -> str:
        return (
            f"<TcpReader {self.channel} #{self.index} <- {self.host}:{self.port}, seq {self.seq}>"
        )

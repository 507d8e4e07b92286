"""TLS for TCP channels: certificate files, contexts, and the TLS variants of the ends'
per-message methods.

When Ray runs with TLS (``RAY_USE_TLS``), every TCP channel connection is TLS with Ray's
certificate files, mutually authenticated; docs/tcp.md ("TLS") says what that protects.
TLS costs only when it is on: a TLS end binds the variants below over its plain
per-message methods when it is made (``_send``/``_drain_acks`` of the writer,
``_fill``/``_send_ack`` of the reader), and a plain end runs exactly the code it runs
without them.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import TYPE_CHECKING, NamedTuple

from dagc.runtime.channels.control import ChannelClosed
from dagc.runtime.channels.tcp.wire import CLOSE_ACK, RING, TcpSetupError, WakePipe, after, freeze

if TYPE_CHECKING:
    from dagc.runtime.channels.tcp.accept import Conn

_TLS_JOIN = 16 << 10  # a TLS frame up to one record's payload is joined before writing

FROM_ENV = "ray"  # default of the ends' ``tls``: whatever Ray uses (dagc.config.ray_tls)
WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TlsFiles(NamedTuple):
    """PEM files: this end's certificate (chain) and key, and the CA both ends trust."""

    cert: str
    key: str
    ca: str


def resolve_tls(tls) -> TlsFiles | None:
    """``tls`` of a channel end -> the files to use, or None for plain TCP. ``FROM_ENV``
    (the default): Ray's settings (TLS exactly when ``RAY_USE_TLS`` is set); None/False:
    plain TCP; a (cert, key, ca) tuple: those files."""
    if tls == FROM_ENV:
        from dagc import config

        tls = config.ray_tls()
    if not tls:
        return None
    return TlsFiles(*tls)


_CONTEXTS: dict = {}
_CONTEXTS_LOCK = threading.Lock()


def tls_context(files: TlsFiles, server_side: bool) -> ssl.SSLContext:
    """The (cached) SSLContext of one side: TLS 1.2 or later, this process's certificate,
    and the peer's certificate *required* and checked against the CA (mutual
    authentication, as Ray's gRPC does with the same variables). No host name check: ends
    connect by IP address and the CA is what admits a member of the cluster; which peer
    of the DAG it is, the HMAC handshake inside TLS then proves. No session tickets and no
    renegotiation: nothing but application data moves after the handshake, so a
    non-blocking end never meets a TLS record it did not ask for."""
    try:
        stamp = tuple(os.stat(f).st_mtime_ns for f in files)  # a replaced file is re-read
    except OSError as e:
        raise TcpSetupError(
            f"TLS is on (RAY_USE_TLS) but {e.filename} cannot be read: {e.strerror}"
        ) from None
    key = (files, stamp, server_side)
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is not None:
            return ctx
        try:
            ctx = ssl.SSLContext(
                ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if not server_side:
                ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_cert_chain(files.cert, files.key)
            ctx.load_verify_locations(cafile=files.ca)
            ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0) | ssl.OP_NO_TICKET
            if server_side:
                ctx.num_tickets = 0
        except (ssl.SSLError, OSError, ValueError) as e:
            raise TcpSetupError(
                f"TLS is on (RAY_USE_TLS) but its files could not be loaded "
                f"(cert {files.cert}, key {files.key}, CA {files.ca}): {e}"
            ) from None
        _CONTEXTS[key] = ctx
        return ctx


def tls_send(sock, parts) -> int:
    """``sendmsg`` for a non-blocking TLS socket, which has none: the parts one by one.
    Returns the bytes written, whole parts only: a part the TLS layer took in part (it
    answered "want write") must be offered again whole, from the same first byte, and is."""
    n = 0
    for p in parts:
        if not len(p):
            continue
        try:
            k = sock.send(p)
        except WANT:
            break
        n += k
        if k < len(p):
            break
    return n


def tls_refused(e: BaseException) -> bool:
    """A TLS error that means "refused" (a certificate, or a peer not speaking TLS), not a
    connection that merely went away (retried)."""
    return isinstance(e, ssl.SSLError) and not isinstance(
        e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
    )


class WriterTls:
    """The TLS variants of ``TcpWriter``'s per-message methods (see the module docstring)."""

    if TYPE_CHECKING:  # what TcpWriter, which this is mixed into, has
        channel: str
        _conns: list[Conn]
        _lock: threading.Lock
        _closed: bool
        _sender: threading.Thread | None
        _kick: WakePipe

        def _lost(self, c: Conn, exc) -> None: ...
        def _send_loop(self) -> None: ...
        @staticmethod
        def _take_acks(c: Conn, data: bytes) -> None: ...

    def _send_tls(self, parts: list) -> None:
        """``_send`` over TLS: the same queueing, every TLS call under the lock (the sender
        thread and this one must not use one TLS object at once)."""
        total = 0
        for p in parts:
            total += len(p)
        if total <= _TLS_JOIN and len(parts) > 1:
            parts = [b"".join(parts)]  # one TLS record and one syscall, not one per part
        frozen = None
        kick = False
        for c in self._conns:
            if c.error is not None:
                self._lost(c, c.error)
            error = None
            with self._lock:
                if self._closed:  # close() took the TLS layer off: never send raw
                    raise ChannelClosed()
                if c.queue:
                    if frozen is None:
                        frozen = freeze(parts)
                    c.queue.extend(frozen)
                    kick = True
                    continue
                try:
                    n = tls_send(c.sock, parts)
                except OSError as e:
                    error = e
                    n = total
                if n < total:
                    if frozen is None:
                        frozen = freeze(parts)
                    c.queue.extend(after(frozen, n))
                    kick = True
            if error is not None:
                self._lost(c, error)
        if kick:
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, daemon=True, name=f"dagc-tcp-send-{self.channel}"
                )
                self._sender.start()
            self._kick.wake()

    def _drain_acks_tls(self, c) -> None:
        """``_drain_acks`` over TLS, under the lock: also takes what the TLS layer already
        decrypted (``pending()``), which would not wake a poll."""
        chunks = []
        error = eof = None
        with self._lock:
            if self._closed:  # close() took the TLS layer off: never read raw
                raise ChannelClosed()
            sock = c.sock
            try:
                d = sock.recv(65536)
                while d:
                    chunks.append(d)
                    if not sock.pending():
                        break
                    d = sock.recv(65536)
                else:
                    eof = True
            except WANT:
                pass
            except OSError as e:
                error = e
        if chunks:
            self._take_acks(c, b"".join(chunks))
        if error is not None or eof:
            with self._lock:
                self._lost(c, error)


class ReaderTls:
    """The TLS variants of ``TcpReader``'s per-message methods (see the module docstring)."""

    if TYPE_CHECKING:  # what TcpReader, which this is mixed into, has
        sock: socket.socket  # an ssl.SSLSocket here
        _big: list | None
        _buf: bytearray
        _mv: memoryview
        _lo: int
        _hi: int
        _eof: bool
        _drained: bool
        _ack_out: bytes
        _ack_new: bytes
        _wake: WakePipe
        _rlock: threading.Lock

        def _advance_big(self, big: list) -> None: ...
        def _compact(self, need: int) -> None: ...

    def _fill_tls(self) -> bool:
        """``_fill`` over TLS: a TLS read returns at most one record, and what it decrypted
        beyond what was asked for waits inside the TLS layer where poll() cannot see it,
        so "drained" also needs ``pending() == 0``. A big frame is read record after record
        here, until it is complete or the socket is empty (one call per record, not one
        pass through the wait loop)."""
        big = self._big
        sock: ssl.SSLSocket = self.sock  # type: ignore[assignment]  # TLS: an SSLSocket
        if big is not None:
            targets = big[1]
            got = 0
            try:
                while big[2] < len(targets):
                    n = sock.recv_into(targets[big[2]][big[3] :])
                    if not n:
                        self._eof = True
                        return got > 0
                    got += n
                    big[3] += n
                    self._advance_big(big)
            except WANT:
                self._drained = True
                return got > 0
            except OSError:
                self._eof = True
                return got > 0
            self._drained = False
            return True
        if self._hi == len(self._buf):
            self._compact(len(self._buf) + (RING if self._lo == 0 else 0))
        want = len(self._buf) - self._hi
        try:
            n = sock.recv_into(self._mv[self._hi :])
        except WANT:
            self._drained = True
            return False
        except OSError:
            n = 0
        if not n:
            self._eof = True
            return False
        self._drained = n < want and not sock.pending()
        self._hi += n
        return True

    def _send_ack_tls(self, ack: bytes) -> None:
        """``_send_ack`` over TLS: a write the TLS layer refused ("want write") must be
        offered again unchanged, so a newer ack waits in ``_ack_new`` behind it."""
        if ack:
            self._ack_new = ack  # cumulative: replaces an older one not yet sent
        sock = self.sock
        try:
            if self._ack_out:
                sock.send(self._ack_out)
                self._ack_out = b""
            new = self._ack_new
            if new:
                self._ack_new = b""
                self._ack_out = new
                sock.send(new)
                self._ack_out = b""
        except WANT:
            pass
        except OSError:  # the writer is gone; the next wait says so
            self._ack_out = self._ack_new = b""

    def _close_tls(self, s, abort: bool) -> None:
        """``close`` over TLS: the reading thread must be out of the TLS layer first; woken,
        it sees ``_closed`` and leaves (or it is in a user's hands: then no CLOSE, just the
        FIN)."""
        self._wake.wake()
        held = self._rlock.acquire(timeout=1.0)
        try:
            if held and not abort:
                self._send_ack_tls(b"")
                if not self._ack_out:
                    tls_send(s, [CLOSE_ACK])
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            if held:
                self._rlock.release()
        try:
            s.close()
        except OSError:
            pass

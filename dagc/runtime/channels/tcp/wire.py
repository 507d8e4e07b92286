"""The TCP channel's wire: constants, the HMAC handshake pieces, errors, helpers.

See dagc/runtime/tcp.py for the protocol.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import select
import socket
import ssl
import struct
import threading
import time
from typing import NamedTuple

from dagc.runtime.channels.ring import PeerDied

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



class _Retry(Exception):
    """Internal: this connection attempt failed in a way worth retrying."""


# -- TLS ------------------------------------------------------------------------------------
FROM_ENV = "ray"        # default of the ends' ``tls``: whatever Ray uses (dagc.config.ray_tls)
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


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
        stamp = tuple(os.stat(f).st_mtime_ns for f in files)   # a replaced file is re-read
    except OSError as e:
        raise TcpSetupError(f"TLS is on (RAY_USE_TLS) but {e.filename} cannot be read: "
                            f"{e.strerror}") from None
    key = (files, stamp, server_side)
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is not None:
            return ctx
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side
                                 else ssl.PROTOCOL_TLS_CLIENT)
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
            raise TcpSetupError(f"TLS is on (RAY_USE_TLS) but its files could not be loaded "
                                f"(cert {files.cert}, key {files.key}, CA {files.ca}): {e}") \
                from None
        _CONTEXTS[key] = ctx
        return ctx


def _tls_send(sock, parts) -> int:
    """``sendmsg`` for a non-blocking TLS socket, which has none: the parts one by one.
    Returns the bytes written, whole parts only: a part the TLS layer took in part (it
    answered "want write") must be offered again whole, from the same first byte, and is."""
    n = 0
    for p in parts:
        if not len(p):
            continue
        try:
            k = sock.send(p)
        except _WANT:
            break
        n += k
        if k < len(p):
            break
    return n


def _tls_refused(e: BaseException) -> bool:
    """A TLS error that means "refused" (a certificate, or a peer not speaking TLS), not a
    connection that merely went away (retried)."""
    return isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError,
                                                              ssl.SSLZeroReturnError))

"""The TCP channel's wire: frame and ack formats, errors, and the socket helpers both ends use.

The protocol (handshake, frames, acks, the window, losses) is described in docs/tcp.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading

from dagc.runtime.channels.control import PeerDied

HELLO = b"DAGCTCP1"
NONCE = 32
MAC = 32
HDR = struct.Struct("<BBHIQ")  # kind, 0, 0, nbufs, main length
HDR_SIZE = HDR.size  # 16
KIND_DATA, KIND_CLOSE, KIND_FAIL = 1, 2, 3
MAX_NAME = 4096
ACK = struct.Struct("<Q")
ACK_CLOSE = (1 << 64) - 1
RING = 256 << 10  # reader ring: frames up to this size are parsed in place
MAX_BUFS = 1 << 24  # sanity bound on a frame's out-of-band buffer count
IOV_MAX = 512  # buffers per sendmsg call (the kernel allows 1024)
SLICE = 0.1  # longest poll sleep between health checks

CLOSE_FRAME = HDR.pack(KIND_CLOSE, 0, 0, 0, 0)  # the writer's orderly close
CLOSE_ACK = ACK.pack(ACK_CLOSE)  # the reader's orderly close
NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class TcpSetupError(ConnectionError):
    """A TCP channel could not be set up (no writer listening in time, bad address)."""


class TcpAuthError(TcpSetupError):
    """The peer failed the HMAC challenge (wrong secret or channel); nothing was unpickled."""


class TcpProtocolError(ConnectionError):
    """An authenticated peer sent a frame this version cannot parse."""


class Retry(Exception):
    """This connection attempt failed in a way worth retrying (a reader's connect loop)."""


def new_secret() -> bytes:
    """A per-compile channel secret."""
    return os.urandom(32)


def check_secret(secret) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("a TCP channel secret must be at least 16 bytes (use tcp.new_secret())")
    return bytes(secret)


def mac(secret: bytes, role: bytes, channel: bytes, n1: bytes, n2: bytes, index: int) -> bytes:
    msg = b"".join(
        (
            b"dagc-tcp\0",
            role,
            b"\0",
            struct.pack("<I", len(channel)),
            channel,
            n1,
            n2,
            struct.pack("<I", index),
        )
    )
    return hmac.new(secret, msg, hashlib.sha256).digest()


def fail_frame(who: str) -> bytes:
    """A FAIL frame naming ``who`` (text, never unpickled)."""
    name = who.encode("utf-8", "replace")[:MAX_NAME]
    return HDR.pack(KIND_FAIL, 0, 0, 0, len(name)) + name


def recv_exact(sock: socket.socket, n: int) -> bytes:
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


def tune_socket(sock: socket.socket, liveness: float, user_timeout: float | None) -> None:
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


def again(e: BaseException) -> BaseException:
    """A fresh copy of a sticky end-of-channel error (re-raising one instance grows its
    traceback on every raise)."""
    if isinstance(e, PeerDied):
        return PeerDied(e.who)
    return type(e)(*e.args)


def proc_name(waiter, proc: int, fallback: str) -> str:
    procs = getattr(waiter, "procs", None)
    if procs is not None and 0 <= proc < len(procs):
        return procs[proc]
    return fallback


def mark_failed(waiter, proc: int) -> None:
    """Tell this node's other processes (through the control segment) that ``proc`` died."""
    control = getattr(waiter, "control", None)
    if control is not None and proc >= 0:
        try:
            control.fail(proc)
        except Exception:
            pass


class WakePipe:
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
                except OSError:  # full: a wake-up is already pending
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


def freeze(parts: list) -> list:
    """A frame as bytes the writer owns: out-of-band buffers (the caller's arrays) are
    copied; the header and the pickle already are its own."""
    return parts[:2] + [bytes(p) for p in parts[2:]]


def freeze_rest(parts: list, n: int) -> list:
    """What is left of a frame after its first ``n`` bytes were sent, as bytes the writer
    owns (only the unsent part of the caller's buffers is copied)."""
    rest = after(parts, n)
    head = len(parts) - len(rest)  # parts[head:] is what is left, rest[0] cut
    return [p if head + i < 2 else bytes(p) for i, p in enumerate(rest)]


def after(parts: list, n: int) -> list:
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

"""The HMAC handshake of a TCP channel, both sides, before a single byte is unpickled.

All fields are fixed-size (docs/tcp.md, "Handshake")::

    W -> R   HELLO + nonce_w
    R -> W   nonce_r + reader index (u32) + HMAC(secret, "reader", chan, nonce_w, nonce_r, index)
    W        compare_digest; wrong MAC, index out of range or taken -> close, nothing sent
    W -> R   HMAC(secret, "writer", chan, nonce_r, nonce_w, index)
    R        compare_digest; wrong -> close, TcpAuthError

With TLS on, the TLS handshake comes first (the writer is the TLS server) and this one runs
inside it, unchanged.
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
import struct

from dagc.runtime.channels.tcp.tls import tls_refused
from dagc.runtime.channels.tcp.wire import HELLO, MAC, NONCE, Retry, TcpAuthError, mac, recv_exact


# -- the writer's side ------------------------------------------------------------------------
def challenge(s: socket.socket, secret: bytes, chan: bytes, nreaders: int):
    """Send the hello and check the reader's answer. Returns (claimed index, nonce_w,
    nonce_r), or None when the MAC is wrong or the index out of range (the caller closes
    the socket and says nothing)."""
    nonce_w = os.urandom(NONCE)
    s.sendall(HELLO + nonce_w)
    msg = recv_exact(s, NONCE + 4 + MAC)
    nonce_r, claimed, proof = (
        msg[:NONCE],
        struct.unpack_from("<I", msg, NONCE)[0],
        msg[NONCE + 4 :],
    )
    want = mac(secret, b"reader", chan, nonce_w, nonce_r, claimed)
    if not hmac.compare_digest(proof, want) or not 0 <= claimed < nreaders:
        return None
    return claimed, nonce_w, nonce_r


def prove(
    s: socket.socket, secret: bytes, chan: bytes, nonce_w: bytes, nonce_r: bytes, index: int
) -> None:
    """The writer's proof, once reader ``index`` is admitted."""
    s.sendall(mac(secret, b"writer", chan, nonce_r, nonce_w, index))


# -- the reader's side ------------------------------------------------------------------------
def dial(
    host: str, port: int, left: float, ctx, secret: bytes, channel: str, index: int
) -> socket.socket:
    """One attempt to connect to the writer as reader ``index`` and authenticate (after TLS
    when ``ctx`` is a client context); ``left``: seconds to the caller's deadline. What is
    worth retrying (refused, unreachable, timed out, shed before the hello) is ``Retry``,
    its ``__cause__`` saying why; a refusal is a TcpAuthError."""
    try:
        s = socket.create_connection((host, port), timeout=min(left, 2.0))
    except OSError as e:
        raise Retry() from e
    try:
        s.settimeout(min(max(left, 0.1), 10.0))
        if ctx is not None:
            s = tls_connect(ctx, s, channel, host, port)
        answer(s, secret, channel, index, host, port)
        return s
    except BaseException:
        s.close()
        raise


def tls_connect(
    ctx: ssl.SSLContext, s: socket.socket, channel: str, host: str, port: int
) -> ssl.SSLSocket:
    """Wrap ``s`` in TLS and shake hands; the writer's certificate must be signed by the CA.
    A refusal either way is a TcpAuthError; a connection that just went away is retried
    (``Retry``)."""
    raw = s
    try:
        s = tls = ctx.wrap_socket(s, server_side=False, do_handshake_on_connect=False)
        tls.do_handshake()
        return tls
    except OSError as e:
        s.close()
        raw.close()
        if tls_refused(e):
            raise TcpAuthError(
                f"TLS handshake with the writer of channel {channel!r} at "
                f"{host}:{port} failed: {e} (its certificate must be signed by "
                f"RAY_TLS_CA_CERT, and it must use TLS too: RAY_USE_TLS set alike on "
                f"every node)"
            ) from None
        raise Retry() from e


def answer(s: socket.socket, secret: bytes, channel: str, index: int, host: str, port: int) -> None:
    """Answer the writer's hello as reader ``index`` and check its proof. A writer that
    shed us before its hello is retried (``Retry``); anything else wrong is a TcpAuthError."""
    chan = channel.encode()
    try:
        hello = recv_exact(s, len(HELLO) + NONCE)
    except (EOFError, OSError) as e:  # the writer shed us before its hello: retry
        if tls_refused(e):  # TLS 1.3: a refused certificate shows here
            raise TcpAuthError(
                f"the writer of channel {channel!r} at {host}:{port} "
                f"refused this reader's TLS certificate: {e} (it must be signed by the "
                f"writer's RAY_TLS_CA_CERT)"
            ) from None
        raise Retry() from e
    if hello[: len(HELLO)] != HELLO:
        raise TcpAuthError(f"{host}:{port} is not a dagc TCP channel writer")
    nonce_w = hello[len(HELLO) :]
    nonce_r = os.urandom(NONCE)
    s.sendall(
        nonce_r + struct.pack("<I", index) + mac(secret, b"reader", chan, nonce_w, nonce_r, index)
    )
    try:
        proof = recv_exact(s, MAC)
    except (EOFError, OSError):
        raise TcpAuthError(
            f"the writer of channel {channel!r} at {host}:{port} rejected "
            f"reader {index} (wrong secret or channel, or the index is taken)"
        ) from None
    want = mac(secret, b"writer", chan, nonce_r, nonce_w, index)
    if not hmac.compare_digest(proof, want):
        raise TcpAuthError(
            f"the peer at {host}:{port} failed authentication for channel "
            f"{channel!r}; nothing it sent was unpickled"
        )

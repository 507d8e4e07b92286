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

What the handshake does and does not protect. It authenticates both ends at connect time:
only a process holding this compile's secret becomes a reader or the writer of this
channel, and nothing is unpickled before that. Without TLS it does *not* protect what
follows: frames travel in the clear with no per-frame authentication, so whoever can read
the TCP stream sees every value, and whoever can inject into it (an on-path attacker,
spoofed packets into the connection) can have arbitrary pickles unpickled in the reader -
code execution. That is Ray's own exposure without TLS; the answer is the same as Ray's.

TLS. When Ray runs with TLS (``RAY_USE_TLS`` = 1/true and ``RAY_TLS_SERVER_CERT``,
``RAY_TLS_SERVER_KEY``, ``RAY_TLS_CA_CERT``, read by ``dagc.config.ray_tls`` exactly as Ray
reads them), every connection is TLS (1.2 or later, the ``ssl`` module) with those files
before anything else: the writer is the TLS server, the reader the client, and each
requires the other's certificate to be signed by the CA (mutual authentication, as Ray's
gRPC does; no host-name check: ends connect by IP address, and the CA is what admits a
cluster member). A peer that does not speak TLS or shows a certificate the CA did not sign
is dropped in the TLS handshake, before a byte of dagc's protocol is read from it. The HMAC
handshake then runs inside TLS, unchanged, so a cluster member without this compile's
secret is still refused; after it every frame and ack is encrypted and integrity-protected
by TLS. Both ends must agree: a TLS reader meeting a plain writer fails at once with
TcpAuthError ("RAY_USE_TLS set alike on every node"); a plain reader meeting a TLS writer
gets no hello and gives up at its connect timeout. ``tls=`` on an end overrides the
environment (None: plain; a (cert, key, ca) tuple: those files). The contexts are built
once per process and file version.

TLS costs only when it is on: a TLS end binds TLS variants of its per-message methods when
it is made (``_send``/``_drain_acks`` of the writer, ``_fill``/``_send_ack`` of the reader),
and a plain end runs exactly the code it ran before. The variants differ where TLS sockets
do: there is no ``sendmsg`` (a frame up to 16 KiB is joined into one record, a bigger one
is written part by part, and a part the TLS layer took only in part - "want write" - is
offered again whole, as OpenSSL requires); "want read/write" stand for EAGAIN; a read returns
at most one record and keeps what it decrypted beyond the request where poll() cannot see
it, so the reader also checks ``pending()``; and one TLS object must never be used by two
threads at once, so every TLS call of a writer (its thread, the sender thread, close())
holds the writer's lock, and a reader's close() waits (up to 1 s) for its reading thread to
leave. Figures: ``python benchmarks/tcp.py``.

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
from dagc.runtime.channels.tcp.reader import TcpReader
from dagc.runtime.channels.tcp.wire import (FROM_ENV, TcpAuthError, TcpProtocolError, TcpSetupError,
                                   TlsFiles, new_secret)
from dagc.runtime.channels.tcp.writer import TcpWriter

__all__ = ["TcpReader", "TcpWriter", "TcpAuthError", "TcpProtocolError", "TcpSetupError",
           "TlsFiles", "FROM_ENV", "new_secret"]

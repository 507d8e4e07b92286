"""The writer's listening side of a TCP channel: bind, accept, authenticate each reader.

An :class:`Acceptor` runs the writer's half of the handshake (``handshake.challenge`` /
``prove``, after TLS when it is on) on a short-lived thread per connection, and keeps each
connection that passed as a :class:`Conn` until the writer takes it (``take``). A flood of
unauthenticated connections is shed (at most 32 handshakes at once); once every reader
index is taken the listening socket closes.
"""

from __future__ import annotations

import socket
import threading
from collections import deque

from dagc.runtime.channels.tcp import handshake
from dagc.runtime.channels.tcp.wire import tune_socket


class Conn:
    """The writer's end of one reader's connection."""

    __slots__ = ("sock", "fd", "index", "name", "proc", "acked", "rx", "closed", "queue", "error")

    def __init__(self, sock, index, name, proc):
        self.sock = sock
        self.fd = sock.fileno()
        self.index = index
        self.name = name
        self.proc = proc
        self.acked = 0  # messages this reader consumed
        self.rx = b""  # a partial ack
        self.closed = False  # the reader sent CLOSE
        self.queue = deque()  # bytes written and not yet taken by the kernel, in order
        self.error = None  # a send error the sender thread ran into


class Acceptor:
    """Accepts and authenticates the ``nreaders`` readers of channel ``channel``.

    ``ctx`` is the TLS server context (None: plain TCP); ``reader_procs``/``reader_names``
    label each reader index; ``arrived()`` is called (from a handshake thread) whenever a
    connection passed, so the writer's thread can take it.
    """

    def __init__(
        self,
        channel: str,
        nreaders: int,
        secret: bytes,
        ctx,
        reader_procs: tuple,
        reader_names: list,
        connect_timeout: float,
        liveness: float,
        stall_timeout: float | None,
        arrived,
    ):
        self.channel = channel
        self._chan = channel.encode()
        self.nreaders = nreaders
        self._secret = secret
        self._ctx = ctx
        self.reader_procs = reader_procs
        self.reader_names = reader_names
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self.stall_timeout = stall_timeout
        self._arrived = arrived
        self.address: tuple | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._taken: set[int] = set()
        self._incoming: list[Conn] = []
        self._handshakes = threading.BoundedSemaphore(32)
        self._lsock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def listening(self) -> bool:
        return self._lsock is not None

    def listen(self, host: str, port: int, advertise: str | None) -> tuple[str, int]:
        """Bind and listen; return the (host, port) readers must connect to."""
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
        self._thread = threading.Thread(
            target=self._accept_loop, daemon=True, name=f"dagc-tcp-accept-{self.channel}"
        )
        self._thread.start()
        return self.address

    def take(self) -> list[Conn]:
        """The connections that passed since the last call."""
        with self._lock:
            new, self._incoming = self._incoming, []
        return new

    def close(self) -> list[Conn]:
        """Stop accepting; return the connections that passed and were never taken (the
        caller closes them). A handshake still running closes its own connection."""
        with self._lock:
            self._closed = True
            left, self._incoming = self._incoming, []
            ls = self._lsock
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return left

    def _accept_loop(self) -> None:
        ls = self._lsock
        if ls is None:  # closed before this thread started
            return
        while not self._closed and len(self._taken) < self.nreaders:
            try:
                s, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if not self._handshakes.acquire(blocking=False):
                s.close()  # a flood of unauthenticated connections: shed it
                continue
            threading.Thread(
                target=self._handshake, args=(s,), daemon=True, name=f"dagc-tcp-auth-{self.channel}"
            ).start()
        with self._lock:
            self._lsock = None
        try:
            ls.close()
        except OSError:
            pass

    def _handshake(self, s: socket.socket) -> None:
        index = -1  # set once this connection owns a reader index
        try:
            s.settimeout(min(10.0, self.connect_timeout))
            if self._ctx is not None:
                # TLS first: a client without a certificate the CA signed, or one not
                # speaking TLS, fails here (closed below) before a byte of ours is read
                s = tls = self._ctx.wrap_socket(s, server_side=True, do_handshake_on_connect=False)
                tls.do_handshake()
            got = handshake.challenge(s, self._secret, self._chan, self.nreaders)
            if got is None:
                s.close()  # wrong secret or channel: say nothing, unpickle nothing
                return
            claimed, nonce_w, nonce_r = got
            with self._lock:
                if self._closed or claimed in self._taken:
                    s.close()
                    return
                self._taken.add(claimed)
                index = claimed
            handshake.prove(s, self._secret, self._chan, nonce_w, nonce_r, index)
            tune_socket(s, self.liveness, self.stall_timeout)
            s.setblocking(False)
            proc = self.reader_procs[index] if index < len(self.reader_procs) else -1
            conn = Conn(s, index, self.reader_names[index], proc)
            with self._lock:
                if self._closed:
                    s.close()
                    return
                self._incoming.append(conn)
            self._arrived()
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
                if ls is not None:  # all readers in: stop accepting now
                    try:
                        ls.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

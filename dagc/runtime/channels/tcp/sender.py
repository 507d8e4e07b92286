"""The writing end of a TCP channel, off the writing thread: the sender thread that drains
the frames the kernel did not take at once, and the acks readers send back (``writer.py``
is the rest; see docs/tcp.md).
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING

from dagc.runtime.channels.control import ChannelClosed
from dagc.runtime.channels.tcp.tls import tls_send
from dagc.runtime.channels.tcp.wire import ACK, ACK_CLOSE, IOV_MAX, NOSIGNAL

if TYPE_CHECKING:
    from dagc.runtime.channels.tcp.accept import Conn
    from dagc.runtime.channels.tcp.writer import TcpWriter

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


def send_loop(w: TcpWriter) -> None:
    """The sender thread: drains queued frames as sockets become writable. Sleeps in
    poll() with no timeout while nothing is queued (an idle channel costs no CPU)."""
    poller = select.poll()
    kick = w._kick.r
    poller.register(kick, _POLLIN)
    conns = list(w._conns)
    byfd = {c.fd: c for c in conns}
    watched: set = set()
    tls = w._ctx is not None
    while not w._closed:
        busy = {c.fd for c in conns if c.queue and c.error is None}
        for fd in watched - busy:
            poller.unregister(fd)
        for fd in busy - watched:
            poller.register(fd, _POLLOUT)
        watched = busy
        events = poller.poll(1000 if busy else None)
        for fd, _ev in events:
            if fd == kick:
                w._kick.drain()
                continue
            c = byfd[fd]
            with w._lock:
                if w._closed or not c.queue:
                    continue
                q = c.queue
                parts = [q[i] for i in range(min(len(q), IOV_MAX))]
                try:
                    n = tls_send(c.sock, parts) if tls else c.sock.sendmsg(parts, (), NOSIGNAL)
                except BlockingIOError:
                    continue
                except OSError as e:
                    c.error = e  # the writer's thread decides what it means
                    q.clear()
                    w._wake.wake()
                    continue
                while n:
                    k = len(q[0])
                    if n < k:
                        q[0] = memoryview(q[0])[n:]
                        break
                    q.popleft()
                    n -= k


def take_acks(c: Conn, data: bytes) -> None:
    """Take the acks in ``data`` (8-byte words; a partial word waits in ``c.rx``): the
    newest counts, and ACK_CLOSE means the reader closed."""
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

"""TCP channels: the transport between nodes, with the shared-memory ring's interface.

``TcpWriter`` / ``TcpReader`` stand wherever ``ring.Writer`` / ``ring.Reader`` stand. The
writer listens, readers connect; an HMAC challenge in both directions keyed by a per-compile
secret precedes any unpickling (TLS around it when Ray uses TLS); one ack per message keeps
the ``slots`` window. The design, the wire format and why it is plain sockets are in
docs/tcp.md.

    wire.py       frame and ack formats, errors, socket helpers
    handshake.py  the HMAC handshake, both sides; a reader's connection attempt
    accept.py     the writer's listening side: accept and authenticate readers
    tls.py        certificate files, contexts, the TLS variants of the per-message methods
    writer.py     TcpWriter
    reader.py     TcpReader
"""

from dagc.runtime.channels.tcp.reader import TcpReader
from dagc.runtime.channels.tcp.tls import FROM_ENV, TlsFiles
from dagc.runtime.channels.tcp.wire import TcpAuthError, TcpProtocolError, TcpSetupError, new_secret
from dagc.runtime.channels.tcp.writer import TcpWriter

__all__ = [
    "TcpReader",
    "TcpWriter",
    "TcpAuthError",
    "TcpProtocolError",
    "TcpSetupError",
    "TlsFiles",
    "FROM_ENV",
    "new_secret",
]

"""The TCP channel alone (no Ray): round-trip latency and throughput over loopback, plain
TCP and TLS side by side.

    python benchmarks/tcp.py [--n 5000] [--modes plain,tls] [--json F]

Two processes: this one writes channel ``fwd`` and reads ``back``; a child echoes every
message it reads on ``fwd`` back on ``back`` (the channels' window is 8). Measured per mode:

- ``rtt``: round trip of a small int, one message at a time (2 hops, acks included):
  p50 / p90 / p99 in microseconds over ``--n`` trips after a warm-up;
- ``small/s``: small ints streamed through the echo with the window full: messages/s;
- ``1MiB``: a 1 MiB numpy array streamed the same way: round trips/s and MB/s each way;
- ``big``: a ``--big-mib`` (64) MiB numpy array's round trip through the echo, one at a
  time (median of ``--big-reps``), next to the same bytes' round trip over a plain
  loopback socket pair between two processes in the same run (``sendall`` / ``recv_into``
  a preallocated buffer: the floor); ``big_vs_socket`` = socket time / channel time
  (1.0 = as fast as a bare socket; the target is >= 0.7).

TLS mode makes a throw-away CA and certificate (``tests/tls_certs.py``: the cryptography
package or the openssl command) and runs both ends with them, as ``RAY_USE_TLS=1`` would.
These are the timing figures the unit tests used to assert (tests/unit/test_tcp.py only
checks behaviour now); ``tests/unit/test_tcp.py::test_tcp_benchmark_runs`` runs this on a
tiny ``n`` so it does not rot.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402  (importable once ROOT is on sys.path)

from dagc.runtime.channels.tcp import TcpReader, TcpWriter, new_secret  # noqa: E402  (importable once ROOT is on sys.path)

ECHO = r"""
import json, sys
from dagc.runtime.channels import ChannelClosed, PeerDied
from dagc.runtime.channels.tcp import TcpReader, TcpWriter
secret, port, tls = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
w = TcpWriter("back", 1, 8, secret, tls=tls)
print(w.listen("127.0.0.1")[1], flush=True)
r = TcpReader("127.0.0.1", port, secret, 0, channel="fwd", tls=tls)
try:
    while True:
        w.write(r.read())
except (ChannelClosed, PeerDied):
    pass
w.close()
"""


PLAIN_ECHO = r"""
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(n)
mv = memoryview(buf)
while True:
    got = 0
    while got < n:
        k = s.recv_into(mv[got:])
        if not k:
            sys.exit(0)
        got += k
    s.sendall(buf)
"""


def plain_socket_rtt(nbytes: int, reps: int) -> float:
    """Median seconds of one ``nbytes`` round trip over a bare loopback TCP connection to
    a child that echoes it (recv_into a preallocated buffer, sendall): the floor."""
    ls = socket.create_server(("127.0.0.1", 0))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [sys.executable, "-c", PLAIN_ECHO, str(nbytes), str(ls.getsockname()[1])], env=env
    )
    try:
        ls.settimeout(30)
        s, _ = ls.accept()
        s.settimeout(120)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = np.ones(nbytes, dtype=np.uint8)
        back = bytearray(nbytes)
        mv = memoryview(back)
        ts = []
        for _ in range(reps + 1):  # the first one warms up
            t0 = time.perf_counter()
            s.sendall(out)
            got = 0
            while got < nbytes:
                got += s.recv_into(mv[got:])
            ts.append(time.perf_counter() - t0)
        s.close()
        return sorted(ts[1:])[len(ts[1:]) // 2]
    finally:
        ls.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _first_line(p: subprocess.Popen, timeout: float = 30.0) -> str:
    out = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        p.kill()
        raise RuntimeError(f"echo child did not start: {p.stderr.read()[-2000:]}")
    return out[0].strip()


def _stream(w, r, values, window: int = 8) -> float:
    """Write ``values`` through the echo keeping ``window`` in flight; seconds taken."""
    deadline = time.monotonic() + 120
    t0 = time.perf_counter()
    sent = got = 0
    n = len(values)
    while got < n:
        while sent < n and sent - got < window:
            w.write(values[sent], deadline)
            sent += 1
        r.read(deadline)
        got += 1
    return time.perf_counter() - t0


def run_mode(mode: str, n: int, tls_files=None, big_mib: int = 64, big_reps: int = 5) -> dict:
    """One mode's figures (see the module docstring)."""
    tls = tuple(tls_files) if mode == "tls" else None
    secret = new_secret()
    w = TcpWriter("fwd", 1, 8, secret, tls=tls)
    host, port = w.listen("127.0.0.1")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ECHO,
            secret.hex(),
            str(port),
            json.dumps(list(tls) if tls else None),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    r = None
    try:
        r = TcpReader(
            host, int(_first_line(p)), secret, 0, channel="back", tls=tls, connect_timeout=30
        )
        deadline = time.monotonic() + 120
        for i in range(min(500, n)):
            w.write(i, deadline)
            assert r.read(deadline) == i
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            w.write(i, deadline)
            r.read(deadline)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        pct = {q: ts[min(n - 1, int(n * q))] * 1e6 for q in (0.5, 0.9, 0.99)}
        small = _stream(w, r, list(range(n)))
        big = np.ones(1 << 20, dtype=np.uint8)
        nbig = max(4, n // 50)
        secs = _stream(w, r, [big] * nbig)
        out = {
            "mode": mode,
            "n": n,
            "rtt_p50_us": pct[0.5],
            "rtt_p90_us": pct[0.9],
            "rtt_p99_us": pct[0.99],
            "small_per_s": n / small,
            "mib_round_trips_per_s": nbig / secs,
            "mib_mb_per_s": nbig * 1.048576 / secs,
        }
        if big_mib:
            huge = np.ones(big_mib << 20, dtype=np.uint8)
            ts = []
            for i in range(big_reps + 1):  # the first one warms up
                huge[0] = i
                t0 = time.perf_counter()
                w.write(huge, deadline + 600)
                got = r.read(deadline + 600)
                ts.append(time.perf_counter() - t0)
                assert got[0] == i and got.size == huge.size
                del got
            chan = sorted(ts[1:])[len(ts[1:]) // 2]
            sock = plain_socket_rtt(big_mib << 20, big_reps)
            out.update(
                big_mib=big_mib,
                big_rtt_ms=chan * 1e3,
                socket_rtt_ms=sock * 1e3,
                big_vs_socket=sock / chan,
            )
        return out
    finally:
        w.close()
        if r is not None:
            r.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def run(n: int = 5000, modes=("plain", "tls"), big_mib: int = 1, big_reps: int = 2) -> list[dict]:
    results = []
    tmp = None
    files = None
    try:
        if "tls" in modes:
            from tests import tls_certs

            why = tls_certs.available()
            if why:
                raise RuntimeError(f"tls mode needs certificates: {why}")
            tmp = tempfile.TemporaryDirectory(prefix="dagc-tcp-bench-")
            ca = tls_certs.make_ca(tmp.name)
            leaf = tls_certs.make_cert(tmp.name, "node", ca)
            files = (leaf.cert, leaf.key, ca.cert)
        for mode in modes:
            results.append(run_mode(mode, n, files, big_mib, big_reps))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def table(results: list[dict]) -> str:
    lines = [
        "mode   rtt p50    p90      p99      small msg/s   1 MiB trips/s  1 MiB MB/s",
        "-----  ---------  -------  -------  ------------  -------------  ----------",
    ]
    for r in results:
        lines.append(
            f"{r['mode']:<5}  {r['rtt_p50_us']:>6.0f} us  {r['rtt_p90_us']:>4.0f} us"
            f"  {r['rtt_p99_us']:>4.0f} us  {r['small_per_s']:>12,.0f}"
            f"  {r['mib_round_trips_per_s']:>13,.0f}  {r['mib_mb_per_s']:>10,.0f}"
        )
    if any("big_rtt_ms" in r for r in results):
        lines += [
            "",
            "mode   big value  channel rtt  plain socket rtt  socket / channel",
            "-----  ---------  -----------  ----------------  ----------------",
        ]
        for r in results:
            if "big_rtt_ms" in r:
                lines.append(
                    f"{r['mode']:<5}  {r['big_mib']:>5} MiB  {r['big_rtt_ms']:>8.1f} ms"
                    f"  {r['socket_rtt_ms']:>13.1f} ms  {r['big_vs_socket']:>16.2f}"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="round trips / small messages")
    ap.add_argument("--modes", default="plain,tls")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument(
        "--big-mib",
        type=int,
        default=64,
        help="size of the big-value round trip vs a plain socket (0: skip)",
    )
    ap.add_argument("--big-reps", type=int, default=5)
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = set(modes) - {"plain", "tls"}
    if bad:
        ap.error(f"unknown modes {sorted(bad)}; use plain and/or tls")
    print(f"TCP channel over loopback, 2 processes, window 8, n={args.n}", flush=True)
    res = run(args.n, modes, args.big_mib, args.big_reps)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tools for the fault-injection tests: probes run inside actors, polling with deadlines,
and a subprocess driver that can be killed.

Functions here run inside actor processes through ``actor.__ray_call__`` too, so this
module must stay importable there (it imports nothing from pytest).
"""

from __future__ import annotations

import glob
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def segments(token: str) -> list[str]:
    """The /dev/shm segments of one compiled DAG."""
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/dagc-{token}-*"))


def mapped(pid: int, token: str) -> int:
    """How many mappings of this DAG's segments process ``pid`` still holds."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for line in f if f"/dev/shm/dagc-{token}-" in line)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def open_fds(pid: int, token: str) -> int:
    """How many fds process ``pid`` holds open on this DAG's segments, named or unlinked
    (an unlinked segment's pages stay allocated, unseen in /dev/shm, while one is open)."""
    n = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/dev/shm/dagc-{token}-"):
                n += 1
        except OSError:
            pass
    return n


def inside(instance, token: str) -> dict:
    """Run in an actor (``h.__ray_call__.remote(inside, token)``): its dagc state for one DAG."""
    from dagc.runtime.actor import lifecycle

    st = lifecycle.status(instance, token)
    return {
        "pid": os.getpid(),
        "running": st["running"],
        "crash": st["crash"],
        "loop_threads": sorted(
            t.name for t in threading.enumerate() if t.name.startswith("dagc-loop") and t.is_alive()
        ),
        "maps": mapped(os.getpid(), token),
        "shm_fds": open_fds(os.getpid(), token),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def state(handle, token: str, timeout: float = 10.0) -> dict:
    import ray

    return ray.get(handle.__ray_call__.remote(inside, token), timeout=timeout)


def wait_until(pred, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``pred`` until true; returns the seconds it took, or fails naming ``what``."""
    t0 = time.monotonic()
    while True:
        last = pred()
        if last:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: still not true after {timeout} s")
        time.sleep(interval)


def loops_stopped(handles, token: str) -> bool:
    for h in handles:
        s = state(h, token)
        if s["running"] or s["loop_threads"] or s["maps"] or s["shm_fds"]:
            return False
    return True


class ChildDriver:
    """A driver process (tests/faults/child_driver.py) joined to the test's Ray cluster.

    It prints one JSON line (token, pid, actor pids) once its DAG runs; ``kill()`` and
    ``wait()`` always reap it, so no test leaves a process behind.
    """

    def __init__(self, mode: str, *names: str, timeout: float = 120.0):
        import ray

        ctx = ray.get_runtime_context()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("RAY_ADDRESS", None)
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.faults.child_driver",
                ctx.gcs_address,
                ctx.namespace,
                mode,
                *names,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            start_new_session=True,
        )
        self._buf = b""
        self.info = self.read_line("DAGC-CHILD", timeout)

    def read_line(self, tag: str, timeout: float) -> dict | None:
        """Wait for the child's next ``TAG {json}`` (or bare ``TAG``) line: its json (None
        for a bare tag). Lines before it are skipped; fails (reaping the child) if none
        comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        want = tag.encode()
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line == want:
                    return None
                if line.startswith(want + b" "):
                    return json.loads(line[len(want) + 1 :])
            if time.monotonic() >= deadline:
                break
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._buf += chunk
            elif self.proc.poll() is not None:
                break
        err = self.kill_and_reap()
        raise AssertionError(
            f"child driver gave no {tag} line within {timeout} s; "
            f"stdout={self._buf[-2000:]!r} stderr={err[-4000:]!r}"
        )

    def send_line(self, text: str = "") -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_and_reap()
            raise AssertionError(f"child driver did not exit within {timeout} s") from None

    def stderr(self) -> str:
        try:
            self._err.seek(0)
            return self._err.read().decode(errors="replace")
        except (ValueError, OSError):
            return ""

    def kill_and_reap(self) -> str:
        self.kill()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        err = self.stderr()
        self.close()
        return err

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self._err):
            try:
                f.close()
            except OSError:
                pass


# -- a failed compile leaves the actors as they were (test_failed_compile.py) ----------------

_GRPC_POOLS = ("grpc_global_tim", "event_engine")  # Ray's gRPC starts and ends these


def census(instance=None) -> dict:
    """This process's threads, fds, sockets (and listening TCP ones) and dagc's own state:
    what a compile that fails must leave exactly as it found it. Runs in an actor through
    ``__ray_call__`` or in the driver (``census()``)."""
    from dagc.runtime.actor import loop, prepared

    fds = os.listdir("/proc/self/fd")
    socks = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            socks.add(int(target[8:-1]))
    listening = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[9]) in socks:  # 0A: LISTEN
                listening += 1
    native = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read()
        except OSError:
            continue
        native += not name.startswith(_GRPC_POOLS)
    return {
        "fds": len(fds),
        "sockets": len(socks),
        "listening": listening,
        # a Dummy-N is a thread Ray's C++ side called into Python on, not one started
        "threads": sorted(
            t.name for t in threading.enumerate() if not isinstance(t, threading._DummyThread)
        ),
        "native_threads": native,
        "dagc_threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("dagc")),
        "prepared": prepared.tokens(),
        "loops": sorted(loop.LOOPS),
        "shm_maps": _dagc_maps(),
    }


def _dagc_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/dagc-" in line)


def fake_placement(instance, node: str, ip: str | None = None) -> None:
    """Make this actor claim to live on ``node`` (and at ``ip``) when dagc probes it, so a
    DAG over actors on one machine compiles the multi-node way: a prepare round, a control
    segment per node, TCP channels between "nodes" (see :func:`fake_probe`)."""
    instance._dagc_fake = (node, ip)


def fake_probe(instance, *args):
    """``lifecycle.probe`` with the node (and address) set by :func:`fake_placement`."""
    import dataclasses

    from dagc.runtime.actor import lifecycle

    p = lifecycle.probe(instance, *args)
    node, ip = getattr(instance, "_dagc_fake", (None, None))
    if node is not None:
        p = dataclasses.replace(p, place=dataclasses.replace(p.place, node=node))
    if ip is not None:
        p = dataclasses.replace(p, ip=ip)
    return p


# -- segment modes at creation time (test_security.py) ---------------------------------------


def record_creates(instance=None) -> None:
    """From now on, this process creates segments under a umask of 0 and records each
    one's (name, mode, owner) right after creating it (names no longer exist while a DAG
    runs, so they are checked as they are made). ``created_segments`` stops it."""
    from dagc.runtime.channels import shm

    if getattr(shm, "_test_real_create", None) is None:
        real = shm._test_real_create = shm.create
        shm._test_created = []

        def create(name, size, *args, **kwargs):
            mm = real(name, size, *args, **kwargs)
            st = os.lstat(shm.path(name))
            shm._test_created.append((name, st.st_mode, st.st_uid))
            return mm

        shm.create = create
        shm._test_umask = os.umask(0)


def created_segments(instance=None) -> list:
    """Stop :func:`record_creates`; the (name, mode, owner) of each segment created."""
    from dagc.runtime.channels import shm

    real = getattr(shm, "_test_real_create", None)
    if real is None:
        return []
    shm.create = real
    shm._test_real_create = None
    os.umask(shm._test_umask)
    return list(shm._test_created)

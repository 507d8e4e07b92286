"""A DAG's control segment, one per node, and how a process waits on a channel.

The control segment (``CTL_SIZE`` bytes, int64 words) says whether the DAG runs and who
belongs to it on this node::

    word    name          meaning
    0       C_STATE       RUNNING, CLOSED (teardown), FAILED (a death), SWAP (profiling switch)
    1       C_WHO         1 + control index of the process whose death set FAILED
    2       C_MAGIC       CTL_MAGIC once the segment is complete (what the sweep trusts)
    3       C_OPENED      processes of this node that have mapped all their segments
    4       C_NODE_PROCS  how many processes of the DAG run on this node
    8 + i   C_PIDS + i    pid of process i (0 = driver), set as it maps its ends

Every wait (:class:`Waiter`) reads ``C_STATE`` between sleep slices, so teardown or a death
noticed anywhere on the node ends every wait there within a slice.
"""

from __future__ import annotations

import os
import time

from dagc.runtime.channels import shm

CTL_SIZE = 4096  # bytes of a control segment
CTL_MAGIC = int.from_bytes(b"dagc-ctl", "little")
C_STATE, C_WHO = 0, 1
C_MAGIC = 2  # CTL_MAGIC: what channels.sweep trusts (with owner and size)
C_OPENED = 3  # processes of this node that have mapped all their segments
C_NODE_PROCS = 4  # how many processes of the DAG run on this node
C_PIDS = 8  # pid of process i at word C_PIDS + i (0 = driver)
RUNNING, CLOSED, FAILED = 0, 1, 2
SWAP = 3  # loops park, then run a new body (profiling on/off)

_monotonic = time.monotonic
_yield = os.sched_yield


class ChannelClosed(Exception):
    """The DAG is being torn down; the loop should stop quietly."""


class PeerDied(Exception):
    """A process of the DAG died (``who`` names it)."""

    def __init__(self, who: str):
        super().__init__(who)
        self.who = who


class WaitTimeout(Exception):
    pass


class Control:
    """A node's control segment of a DAG: run state and the pids of its processes there.

    ``create`` makes it with ``nprocs`` (the DAG's processes on this node, which
    :meth:`mark_opened` counts) and, if given, ``pid`` as process ``index``'s (the
    creator's, so a DAG whose creator dies before anyone else joins is stale).
    """

    def __init__(
        self, name: str, create: bool = False, nprocs: int = 0, index: int = -1, pid: int = 0
    ):
        self.name = name
        self.mm = shm.create(name, CTL_SIZE) if create else shm.open_existing(name)
        self.words = memoryview(self.mm).cast("q")
        if create:
            self.words[C_NODE_PROCS] = nprocs
            if index >= 0:
                self.words[C_PIDS + index] = pid
            self.words[C_MAGIC] = CTL_MAGIC  # last: a complete control segment

    def mark_opened(self, names) -> bool:
        """This process has mapped every segment of this node it needs: count it; the
        last process of the node to do so removes ``names`` (the node's segment names,
        this control's last), as nobody will open them by name again. Returns whether this
        call removed them. The count is taken under a flock of the segment, so exactly one
        process sees it complete."""

        def count():
            n = self.words[C_OPENED] + 1
            self.words[C_OPENED] = n
            if n < self.words[C_NODE_PROCS]:
                return False
            for name in names:
                if name != self.name:
                    shm.unlink(name)
            shm.unlink(self.name)
            return True

        return bool(shm.with_lock(self.name, count))

    @property
    def state(self) -> int:
        return self.words[C_STATE]

    def set_pid(self, index: int, pid: int) -> None:
        self.words[C_PIDS + index] = pid

    def pid(self, index: int) -> int:
        return self.words[C_PIDS + index]

    def fail(self, who_index: int) -> None:
        if self.words[C_STATE] == RUNNING:
            self.words[C_WHO] = who_index + 1
            self.words[C_STATE] = FAILED

    def close(self) -> None:
        try:
            if self.words[C_STATE] == RUNNING:
                self.words[C_STATE] = CLOSED
        except ValueError:  # already released
            pass

    def release(self) -> None:
        try:
            self.words.release()
            self.mm.close()
        except (BufferError, ValueError):
            pass


class Waiter:
    """How a process waits: the wait mode, the adaptive budget, and the health checks.

    ``procs`` are the DAG's process names by control index (0 = driver).
    """

    SPIN, BLOCK, ADAPTIVE = "spin", "block", "adaptive"
    MIN_BUDGET, MAX_BUDGET = 20e-6, 2e-3
    SLICE = 0.1  # longest futex sleep between health checks

    def __init__(self, control: Control, procs: list[str], mode: str = "adaptive"):
        self.control = control
        self.cw = control.words
        self.procs = procs
        self.mode = mode
        self.budget = 200e-6 if mode == self.ADAPTIVE else (1e9 if mode == self.SPIN else 0.0)
        self._last_liveness = 0.0

    def check(self, peers: tuple, deadline: float | None) -> None:
        """Raise ChannelClosed / PeerDied / WaitTimeout when the wait must end."""
        st = self.cw[C_STATE]
        if st != RUNNING:
            if st == FAILED:
                who = self.cw[C_WHO] - 1
                raise PeerDied(self.procs[who] if 0 <= who < len(self.procs) else "?")
            raise ChannelClosed()
        now = _monotonic()
        if now - self._last_liveness > 0.2:
            self._last_liveness = now
            for i in peers:
                pid = self.cw[C_PIDS + i]
                if pid and not shm.pid_alive(pid):
                    self.control.fail(i)
                    raise PeerDied(self.procs[i] if i < len(self.procs) else "?")
        if deadline is not None and now >= deadline:
            raise WaitTimeout()

    def wait(
        self,
        words,
        idx: int,
        target: int,
        addr: int,
        sleep_idx: int,
        peers: tuple,
        deadline: float | None = None,
    ) -> None:
        """Return once ``words[idx] >= target``."""
        if words[idx] >= target:
            return
        budget = self.budget
        if budget > 0.0:
            # Poll with sched_yield between looks: with more processes than cores the one
            # holding the data gets the CPU within a yield; the loop stays tight (16 looks
            # per clock read) because its period is the hand-off latency.
            t0 = _monotonic()
            n = 0
            while True:
                for _ in range(16):
                    _yield()
                    if words[idx] >= target:
                        return
                now = _monotonic()
                if now - t0 > budget:
                    break
                n += 1
                if not n & 63 or (deadline is not None and now >= deadline):
                    self.check(peers, deadline)
        t1 = _monotonic()
        while True:
            words[sleep_idx] = 1
            v = words[idx]
            if v >= target:
                words[sleep_idx] = 0
                break
            slice_ = self.SLICE
            if deadline is not None:
                slice_ = max(0.0, min(slice_, deadline - _monotonic()))
            shm.futex_wait(addr + idx * 8, v, slice_)
            words[sleep_idx] = 0
            if words[idx] >= target:
                break
            self.check(peers, deadline)
        if self.mode == self.ADAPTIVE:
            self._tune(_monotonic() - t1)

    def _tune(self, waited: float) -> None:
        # Called after a wait that outlasted the polling budget (one that ends inside it
        # keeps the budget): a wake-up shortly after the budget ran out means the budget
        # was a little short: double it. Long idle sleeps shrink it back, so an idle DAG
        # polls less before sleeping next time.
        if waited < 4 * self.budget:
            self.budget = min(self.MAX_BUDGET, self.budget * 2)
        elif waited > 0.05:
            self.budget = max(self.MIN_BUDGET, self.budget / 2)

"""Communicators that fail on purpose (importable by actors; imports torch)."""

from dagc.runtime.comm.gloo import GlooCommunicator


class BadPrepareComm(GlooCommunicator):
    """Rank 0 cannot make its rendezvous info: the compile fails after the prepare round,
    before the start round."""

    def prepare(self):
        raise RuntimeError("injected: this communicator cannot prepare")

"""The runtime: what runs after compiling, split by where it runs.

    channels/   how bytes move between processes (shared-memory rings, TCP)
    comm/       how tensors move (communicators) and the ends generated loops call
    actor/      what runs inside an actor (probe, prepare, start, the loop thread)
    driver/     what runs in the driver (CompiledDag, DagRef, launch, profiling)

See docs/architecture.md.
"""

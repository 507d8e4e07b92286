"""Communicators: how tensors move between actors, and the ends generated loops call.

    base.py        the Communicator interface (what a custom transport subclasses), Work
    gloo.py        GlooCommunicator: torch.distributed's gloo backend, CPU tensors
    nccl.py        NcclCommunicator: cupy.cuda.nccl, GPU tensors
    backends.py    the built-in backends by name
    ray_adapter.py RayCommunicator: a Ray Compiled Graph Communicator driven as one of these
    ray_adopt.py   the driver's check of Ray Communicators in a DAG, wrapping them
    packing.py     a value split into metadata and tensors, and put back together
    p2p.py         CommWriter / CommReader: the ends of a tensor-transport edge
    collective.py  Collective: one participant of an all-reduce, all-gather, reduce-scatter

packing, p2p and collective import torch; the backends import it (or cupy) only when a group
is set up.
"""

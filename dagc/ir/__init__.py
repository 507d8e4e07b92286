"""The dagc IR: plain data between the frontend and code generation.

values  names and their one order: Arg (Ref t3/t3.1, Field $0, Const #2), INPUT ("in"),
        DRIVER, op kinds, op_sort_key / value_key / proc_key
core    the IR graph of Ops, its actor/input/output/channel/communicator tables
verify  what IR.verify() checks
"""

from dagc.ir.core import (
    IR,
    ActorSpec,
    ChannelSpec,
    CommGroup,
    InputSpec,
    Op,
    OutputSpec,
    SideTable,
    bind_reordered,
)
from dagc.ir.values import (
    CALL,
    COLLECTIVE,
    DRIVER,
    INPUT,
    KINDS,
    Arg,
    Const,
    Field,
    Ref,
    op_sort_key,
    proc_key,
    value_key,
)

__all__ = [
    "CALL",
    "COLLECTIVE",
    "DRIVER",
    "INPUT",
    "IR",
    "KINDS",
    "ActorSpec",
    "Arg",
    "ChannelSpec",
    "CommGroup",
    "Const",
    "Field",
    "InputSpec",
    "Op",
    "OutputSpec",
    "Ref",
    "SideTable",
    "bind_reordered",
    "op_sort_key",
    "proc_key",
    "value_key",
]

"""The schedule: what each process does at each step, as plain data.

action  Kind (str-valued enum), Action (prints compactly, parses back), Entry (step,
        action), Call (a call's arguments)
table   Schedule: per-process columns, calls, channels; the Step x Actor table and its
        JSON and CSV forms, each of which reads back to an equal schedule
check   problems(schedule): sends without receives, waits without issues, ...
html    schedule_html (notebooks)
"""

from dagc.schedule.action import (
    COMM_KINDS,
    OP_KINDS,
    RECV_KINDS,
    SEND_KINDS,
    Action,
    Call,
    Entry,
    Kind,
)
from dagc.schedule.table import FORMAT, Schedule

__all__ = [
    "COMM_KINDS",
    "FORMAT",
    "OP_KINDS",
    "RECV_KINDS",
    "SEND_KINDS",
    "Action",
    "Call",
    "Entry",
    "Kind",
    "Schedule",
]

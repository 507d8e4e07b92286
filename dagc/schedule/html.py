"""The schedule as HTML for notebooks (``Schedule._repr_html_``). Every text is escaped::

<div class="dagc-schedule">
  <table> step | driver | a0:Stage | ... </table>     one row per step
  <table> channel | value | writer | readers | transport | buffer </table>
</div>
"""

from __future__ import annotations

import html

MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px"
_CELL = "padding: 2px 8px; text-align: left; vertical-align: top; white-space: nowrap"


def escape(s) -> str:
    return html.escape(str(s), quote=True)


def _row(cells: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f'<{tag} style="{_CELL}">{c}</{tag}>' for c in cells) + "</tr>"


def step_table_html(schedule) -> str:
    """``<table>``: a header row (step, then each actor's label), one row per step.

    A cell lists that actor's actions at that step (``recv t2&lt;a0``), one per line;
    hovering shows the full form (``t3 = fwd(t2)``).
    """
    cols = list(schedule.actors)
    grid = {
        (s, a): [
            f'<span title="{escape(schedule.detail(a, act))}">{escape(act)}</span>' for act in v
        ]
        for (s, a), v in schedule.cells().items()
    }
    rows = [_row(["step"] + [escape(schedule.label(a)) for a in cols], "th")]
    for s in range(schedule.num_steps):
        rows.append(_row([str(s)] + ["<br>".join(grid.get((s, a), [])) for a in cols]))
    return f'<table style="{MONO}; border-collapse: collapse">' + "".join(rows) + "</table>"


def channels_html(schedule) -> str:
    """``<table>``: one row per channel: id, value, writer, readers, transport, buffer."""
    rows = [_row(["channel", "value", "writer", "readers", "transport", "buffer"], "th")]
    for c in schedule.channels:
        transport = c.transport + (f" via {c.communicator}" if c.communicator else "")
        rows.append(
            _row(
                [
                    escape(c.id),
                    escape(c.value),
                    escape(c.writer),
                    escape(", ".join(c.readers)),
                    escape(transport),
                    escape(f"{c.slots} x {c.buffer_size} B"),
                ]
            )
        )
    return f'<table style="{MONO}; border-collapse: collapse">' + "".join(rows) + "</table>"


def schedule_html(schedule) -> str:
    """The schedule as HTML: the Step x Actor table, then the channel list."""
    parts = ['<div class="dagc-schedule">', step_table_html(schedule)]
    if schedule.channels:
        parts += ["<p><b>channels</b></p>", channels_html(schedule)]
    parts.append("</div>")
    return "\n".join(parts)

"""HTML views of a schedule for notebooks (``_repr_html_``). Every text is escaped.

``schedule_html`` gives the Step x Actor table and the channel list::

    <div class="dagc-schedule">
      <table> step | driver | a0:Stage | ... </table>     one row per step
      <table> channel | value | writer | readers | transport | buffer </table>
    </div>

``compiled_html`` adds the dataflow graph (inline SVG when Graphviz can draw it, else the
ASCII listing in <pre>) and, when given, each actor's generated source in a collapsible
<details> block.
"""
from __future__ import annotations

import html

from dagc.inspect.graph import RenderUnavailableError, render
from dagc.ir import proc_key
from dagc.schedule import Schedule

_MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px"
_CELL = "padding: 2px 8px; text-align: left; vertical-align: top; white-space: nowrap"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _row(cells: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f'<{tag} style="{_CELL}">{c}</{tag}>' for c in cells) + "</tr>"


def step_table_html(schedule: Schedule) -> str:
    """``<table>``: a header row (step, then each actor's label), one row per step.

    A cell lists that actor's actions at that step (``recv t2&lt;a0``), one per line;
    hovering shows the full form (``t3 = fwd(t2)``).
    """
    cols = list(schedule.actors)
    grid = {k: [f'<span title="{_e(act.detail())}">{_e(text)}</span>' for act, text in v]
            for k, v in schedule.cells().items()}
    rows = [_row(["step"] + [_e(schedule.labels.get(a, a)) for a in cols], "th")]
    for s in range(schedule.num_steps):
        rows.append(_row([str(s)] + ["<br>".join(grid.get((s, a), [])) for a in cols]))
    return f'<table style="{_MONO}; border-collapse: collapse">' + "".join(rows) + "</table>"


def channels_html(schedule: Schedule) -> str:
    """``<table>``: one row per channel: id, value, writer, readers, transport, buffer."""
    rows = [_row(["channel", "value", "writer", "readers", "transport", "buffer"], "th")]
    for c in schedule.channels:
        transport = c.transport + (f" via {c.communicator}" if c.communicator else "")
        rows.append(_row([_e(c.id), _e(c.value), _e(c.writer), _e(", ".join(c.readers)),
                          _e(transport), _e(f"{c.slots} x {c.buffer_size} B")]))
    return f'<table style="{_MONO}; border-collapse: collapse">' + "".join(rows) + "</table>"


def schedule_html(schedule: Schedule) -> str:
    """The schedule as HTML: the Step x Actor table, then the channel list."""
    parts = ['<div class="dagc-schedule">', step_table_html(schedule)]
    if schedule.channels:
        parts += ["<p><b>channels</b></p>", channels_html(schedule)]
    parts.append("</div>")
    return "\n".join(parts)


def graph_html(schedule: Schedule) -> str:
    """The dataflow graph as inline ``<svg>`` when Graphviz is installed, else ``<pre>``."""
    try:
        svg = render(schedule, "svg")
    except RenderUnavailableError:
        return f'<pre style="{_MONO}">{_e(render(schedule, "ascii"))}</pre>'
    start = svg.find("<svg")             # drop the XML prolog and DOCTYPE
    return svg[start:] if start >= 0 else svg


def sources_html(sources: dict[str, str], labels: dict | None = None) -> str:
    """One collapsed ``<details>`` per generated module, summary = the actor's label."""
    labels = labels or {}
    blocks = []
    for actor in sorted(sources, key=proc_key):
        blocks.append(f"<details><summary>{_e(labels.get(actor, actor))} generated source"
                      f"</summary><pre style=\"{_MONO}\">{_e(sources[actor])}</pre></details>")
    return "\n".join(blocks)


def compiled_html(schedule: Schedule, sources: dict[str, str] | None = None) -> str:
    """A compiled DAG as HTML: schedule table, channels, dataflow graph, generated sources."""
    parts = ['<div class="dagc-compiled">', schedule_html(schedule),
             "<p><b>dataflow graph</b></p>", graph_html(schedule)]
    if sources:
        parts += ["<p><b>generated code</b></p>", sources_html(sources, schedule.labels)]
    parts.append("</div>")
    return "\n".join(parts)

"""HTML views of a compiled DAG for notebooks (``_repr_html_``). Every text is escaped.

``compiled_html`` gives the schedule (``dagc.schedule.html.schedule_html``: the Step x
Actor table and the channel list), the dataflow graph (inline SVG when Graphviz can draw
it, else the ASCII listing in <pre>) and, when given, each actor's generated source in a
collapsible <details> block.
"""

from __future__ import annotations

from collections.abc import Mapping

from dagc.inspect.graph import RenderUnavailableError, render
from dagc.ir import proc_key
from dagc.schedule import Schedule
from dagc.schedule.html import MONO, escape, schedule_html

__all__ = ["compiled_html", "graph_html", "schedule_html", "sources_html"]


def graph_html(schedule: Schedule) -> str:
    """The dataflow graph as inline ``<svg>`` when Graphviz is installed, else ``<pre>``."""
    try:
        svg = render(schedule, "svg")
    except RenderUnavailableError:
        return f'<pre style="{MONO}">{escape(render(schedule, "ascii"))}</pre>'
    start = svg.find("<svg")  # drop the XML prolog and DOCTYPE
    return svg[start:] if start >= 0 else svg


def sources_html(sources: Mapping[str, str], labels: Mapping[str, str] | None = None) -> str:
    """One collapsed ``<details>`` per generated module, summary = the actor's label."""
    labels = labels or {}
    blocks = []
    for actor in sorted(sources, key=proc_key):
        blocks.append(
            f"<details><summary>{escape(labels.get(actor, actor))} generated source"
            f'</summary><pre style="{MONO}">{escape(sources[actor])}</pre></details>'
        )
    return "\n".join(blocks)


def compiled_html(schedule: Schedule, sources: dict[str, str] | None = None) -> str:
    """A compiled DAG as HTML: schedule table, channels, dataflow graph, generated sources."""
    parts = [
        '<div class="dagc-compiled">',
        schedule_html(schedule),
        "<p><b>dataflow graph</b></p>",
        graph_html(schedule),
    ]
    if sources:
        parts += ["<p><b>generated code</b></p>", sources_html(sources, schedule.labels)]
    parts.append("</div>")
    return "\n".join(parts)

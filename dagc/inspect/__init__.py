"""Inspection of compiled DAGs: graphs, HTML, profiling traces and on-disk artifacts.

Everything here is a pure function over plain data (a Schedule, generated sources, timing
records), so it works without Ray and on a schedule read back from ``schedule.json``.

    graph       to_ascii, to_dot, render(schedule, "ascii" | "dot" | "svg" | "png")
    html        schedule_html, compiled_html                       (notebooks)
    trace       chrome_trace, summary, summary_dict                (profiling)
    artifacts   write_artifacts, show, load_schedule               (-o DIR, cg.dump)
"""
from dagc.inspect.artifacts import ArtifactsError, load_schedule, show, write_artifacts
from dagc.inspect.graph import RenderUnavailableError, render, to_ascii, to_dot
from dagc.inspect.html import compiled_html, schedule_html
from dagc.inspect.trace import chrome_trace, summary, summary_dict

__all__ = ["ArtifactsError", "RenderUnavailableError", "chrome_trace", "compiled_html",
           "load_schedule", "render", "schedule_html", "show", "summary", "summary_dict",
           "to_ascii", "to_dot", "write_artifacts"]

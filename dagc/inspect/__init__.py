"""Inspection of compiled DAGs: graphs, HTML, profile timelines and on-disk artifacts.

Everything here is a pure function over plain data (a Schedule, generated sources, timing
records), so it works without Ray and on a schedule read back from ``schedule.json``.

    graph       to_ascii, to_dot, render(schedule, "ascii" | "dot" | "svg" | "png")
    html        schedule_html, compiled_html                       (notebooks)
    timeline    match_spans, timeline_json (Chrome trace-event JSON)   (profiling)
    profile_stats  summary, summary_dict, measured_timing, measured_costs
    artifacts   write_artifacts, show, load_schedule               (-o DIR, cg.dump)
"""

from dagc.inspect.artifacts import ArtifactsError, load_schedule, show, write_artifacts
from dagc.inspect.graph import RenderUnavailableError, render, to_ascii, to_dot
from dagc.inspect.html import compiled_html, schedule_html
from dagc.inspect.profile_stats import summary, summary_dict
from dagc.inspect.timeline import timeline_json

__all__ = [
    "ArtifactsError",
    "RenderUnavailableError",
    "compiled_html",
    "load_schedule",
    "render",
    "schedule_html",
    "show",
    "summary",
    "summary_dict",
    "timeline_json",
    "to_ascii",
    "to_dot",
    "write_artifacts",
]

"""Frontend: walk a Ray DAG (InputNode / bind / MultiOutputNode / collectives) into dagc IR."""

from dagc.frontend.walk import walk

__all__ = ["walk"]

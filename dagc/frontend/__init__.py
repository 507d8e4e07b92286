"""Frontend: walk a Ray DAG (InputNode / bind / MultiOutputNode / collectives) into dagc IR."""
from dagc.frontend.trace import trace

__all__ = ["trace"]

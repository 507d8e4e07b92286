"""What runs in the driver: CompiledDag, DagRef, starting the loops, profiling."""

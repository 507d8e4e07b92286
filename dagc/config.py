"""Every DAGC_* environment variable dagc reads, read here and nowhere else."""
import os

# Keep large payload buffers on the malloc heap (see shm.tune_malloc); "0" turns it off.
MALLOC_TUNE = os.environ.get("DAGC_MALLOC_TUNE", "1") != "0"

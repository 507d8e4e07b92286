#!/usr/bin/env bash
# What only a GPU machine can show (CI runs the NCCL path on fakes: tests/unit/test_nccl_fake.py).
# One command, from the repository root:   bash tests/gpu/run.sh
#
# It installs the `gpu` extra (cupy for NCCL), checks that CUDA is visible, then runs
#   - tests/gpu/           NcclCommunicator on a real GPU: streams, events, compute overlap;
#   - the communicator end-to-end tests with real actors (gloo, Ray Communicator adapters),
#     which on a GPU machine also see real CUDA devices through Ray.
# Every test has a timeout (pyproject's pytest-timeout); the run takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q -e ".[gpu,test]"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "tests/gpu/run.sh needs a CUDA GPU (torch sees none)"
import cupy.cuda.nccl  # noqa: F401  - the NCCL bindings dagc uses
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"NCCL {cupy.cuda.nccl.get_version()}")
PY
python -m pytest -q -p no:cacheprovider -rs tests/gpu tests/e2e/test_comm.py \
    tests/e2e/test_ray_communicator.py "$@"

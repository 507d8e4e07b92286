"""Every DAGC_* environment variable dagc reads, and Ray's TLS variables, read here and
nowhere else."""

import os

# Keep large payload buffers on the malloc heap (see shm.tune_malloc); "0" turns it off.
MALLOC_TUNE = os.environ.get("DAGC_MALLOC_TUNE", "1") != "0"

# "1": run IR.verify() after every compiler pass (dagc.passes.base.run_passes).
VERIFY = os.environ.get("DAGC_VERIFY", "0") == "1"

# Metrics through Ray's metrics API (docs/metrics.md): "1" on, "0" off, "auto" (default) on
# when ray[default]'s metrics agent can run; the driver's sampler wakes every INTERVAL s.
METRICS = os.environ.get("DAGC_METRICS", "auto")
METRICS_INTERVAL = float(os.environ.get("DAGC_METRICS_INTERVAL", "5"))

# Ray's TLS settings, beside dagc's own: when Ray runs with TLS, dagc's TCP channels use it
# too, with the same certificates (see docs/tcp.md, "TLS").
RAY_TLS_VARS = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def ray_tls() -> tuple[str, str, str] | None:
    """(cert, key, CA) file paths when ``RAY_USE_TLS`` is "1" or "true" (any case), exactly
    as Ray reads it (``ray._private.grpc_utils``, ``ray._common.tls_utils``); None
    otherwise. Read at each call (a channel end is made once per compile): a process that
    sets the variables after importing dagc is seen. ``RAY_USE_TLS`` without all three
    paths is an error, as in Ray."""
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    missing = [v for v in RAY_TLS_VARS if not os.environ.get(v)]
    if missing:
        raise RuntimeError(
            f"RAY_USE_TLS is set, so {', '.join(RAY_TLS_VARS)} must be set too "
            f"(missing: {', '.join(missing)}); dagc's TCP channels use the "
            f"same certificates as Ray"
        )
    cert, key, ca = (os.environ[v] for v in RAY_TLS_VARS)
    return cert, key, ca

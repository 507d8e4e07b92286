"""``dagc.compile`` and ``dagc.get``: the calls most programs need.

``compile`` is the stages of ``dagc/stages.py`` in a row; its options are ``dagc/options.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dagc.options import DEFAULTS, WAIT_MODES, check_options
from dagc.stages import compile

if TYPE_CHECKING:
    from dagc.runtime.driver.dagref import DagRef

__all__ = ["compile", "get", "check_options", "DEFAULTS", "WAIT_MODES"]


def get(refs: Iterable[DagRef], timeout: float | None = None) -> list[Any]:
    """Values of several DagRefs, in order; ``timeout`` bounds the whole call."""
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for r in refs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        out.append(r.get(timeout=left))
    return out

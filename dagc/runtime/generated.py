"""Generated modules, loaded: the one place the driver and the actors turn source into code.

The source is registered with ``linecache`` under its descriptive filename
(``<dagc a1:Stage 3f2a9c1d0e4b>``) before it runs, so tracebacks, pdb and
``failure.generated_context`` show the generated lines.
"""

from __future__ import annotations

import linecache
from typing import Any


def load(source: str, filename: str, module_name: str | None = None) -> dict[str, Any]:
    """Compile ``source`` as ``filename``, register it with linecache, execute it in a fresh
    namespace (``__name__`` = ``module_name`` when given) and return that namespace."""
    code = compile(source, filename, "exec")
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict[str, Any] = {} if module_name is None else {"__name__": module_name}
    exec(code, ns)
    return ns

"""Run existing Ray Compiled Graph code on dagc: ``dagc.patch_ray()``.

    import dagc
    dagc.patch_ray()                    # or DAGC_PATCH_RAY=1 (see below)
    cdag = dag.experimental_compile()   # a dagc CompiledDag with Ray's API (dagc.ray_graph)
    ray.get(cdag.execute(1))
    dagc.unpatch_ray()
    with dagc.patched_ray(): ...        # the context-manager form

What the patch does
-------------------
``DAGNode.experimental_compile(**ray_kwargs)`` becomes ``dagc.compile`` with the keywords
mapped (:func:`map_compile_options`, ``dagc/ray_options.py``), returning a
:class:`dagc.ray_graph.RayCompiledDag`: an instance of ``dagc.CompiledDag`` whose
``execute``/``execute_async``/``teardown``/``visualize`` follow Ray's API. Nothing else of
Ray is changed: ``ray.get`` accepts dagc refs because they are ``CompiledDAGRef``s, and
dagc's errors are Ray's exception classes (``dagc/errors.py``) - both with or without the
patch.

Reaching every process
----------------------
* ``patch_ray()`` before ``ray.init()`` (or before Ray auto-initialises) also adds
  ``dagc.ray_compat.worker_setup_hook`` as the job's ``worker_process_setup_hook``, so
  DAGs compiled *inside actors* are dagc's too. It is added to the runtime_env the job
  gets anyway (``runtime_env=`` as a dict or ``RuntimeEnv``, ``JobConfig(runtime_env=)``,
  a submitted job's), so nothing the user set is lost; a job with a setup hook of its own
  keeps it, with a warning that dagc's cannot also run (Ray runs one). It also sets
  ``DAGC_PATCH_RAY=1`` in the environment, which a Ray started from here passes on to its
  workers and subprocesses.
  Called after ``ray.init()``, it cannot change the running job's workers (Ray fixes a
  job's runtime_env at init) and warns once.
* ``DAGC_PATCH_RAY=1``: ``import dagc`` patches (so every process that imports dagc, Ray
  workers started with the variable included); for a program that never imports dagc, run
  it as ``python -m dagc.ray_compat program.py [args]``.

This module imports nothing from Ray at import time (Ray's modules load on first use).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # lazily reachable by __getattr__ below (Ray loads on first use)
    from dagc.ray_graph import RayCompiledDag, RayDagFuture, RayDagRef

from dagc.ray_options import check_named_communicators, map_compile_options, warn_once

logger = logging.getLogger(__name__)

ENV = "DAGC_PATCH_RAY"
_ORIGINAL = None  # Ray's DAGNode.experimental_compile while patched
_ORIGINAL_INIT = None  # Ray's ray.init while wrapped (patch_ray before ray.init)
_SET_ENV = False  # whether patch_ray set DAGC_PATCH_RAY (unpatch_ray removes it)
_HOOK = "dagc.ray_compat.worker_setup_hook"
_LOCK = threading.RLock()


# -- the patch -------------------------------------------------------------------------------


def _experimental_compile(
    self,
    _submit_timeout=None,
    _buffer_size_bytes=None,
    enable_asyncio=False,
    _max_inflight_executions=None,
    _max_buffered_results=None,
    _overlap_gpu_communication=None,
    _default_communicator="create",
):
    """``ray.dag.DAGNode.experimental_compile`` under the patch (the same signature): a
    dagc CompiledDag with Ray's API (:class:`dagc.ray_graph.RayCompiledDag`)."""
    from dagc import stages
    from dagc.ray_graph import RayCompiledDag

    if getattr(self, "is_cgraph_output_node", False):
        raise ValueError(
            "It is not allowed to call `experimental_compile` on the same DAG object "
            "multiple times no matter whether `teardown` is called or not. Please reuse "
            "the existing compiled DAG or create a new one."
        )
    opts, ray_side = map_compile_options(
        _submit_timeout=_submit_timeout,
        _buffer_size_bytes=_buffer_size_bytes,
        enable_asyncio=enable_asyncio,
        _max_inflight_executions=_max_inflight_executions,
        _max_buffered_results=_max_buffered_results,
        _overlap_gpu_communication=_overlap_gpu_communication,
        _default_communicator=_default_communicator,
    )
    from dagc.frontend.inputs import check_dag_inputs
    from dagc.frontend.walk import check_ray_leaves

    self.is_cgraph_output_node = True
    _check_compiled_once(self)  # before Ray's other checks, as Ray walks first
    check_dag_inputs(self)  # an unused inp[i] first, as Ray checks
    check_ray_leaves(self)  # Ray's rule: an unused return of num_returns too
    check = check_named_communicators if ray_side["need_named_communicator"] else None
    cg = stages.compile_as(RayCompiledDag, self, opts, check=check)
    cg._ray_get_timeout = ray_side["get_timeout"]
    cg._enable_asyncio = ray_side["enable_asyncio"]
    if ray_side["visualize_schedule"]:
        print(cg.schedule)
    return cg


def _check_compiled_once(root) -> None:
    """Ray's rule under the patch: no other node of the DAG connected to ``root`` (up or
    down its edges) was compiled (a branch of a compiled ``MultiOutputNode``), refused
    with Ray's words."""
    from collections import deque

    from dagc.errors import CompileError

    seen: set[int] = set()
    queue, first = deque([root]), None
    while queue:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "is_cgraph_output_node", False):
            if first is not None:
                raise CompileError(
                    "The DAG was compiled more than once. The following two nodes call "
                    f"`experimental_compile`: (1) {first}, (2) {node}"
                )
            first = node
        queue.extend(getattr(node, "_downstream_nodes", ()))
        queue.extend(getattr(node, "_upstream_nodes", ()))


def patch_ray(workers: bool = True) -> None:
    """Make ``DAGNode.experimental_compile`` compile with dagc. Idempotent.

    ``workers``: also reach DAGs compiled inside actors (see the module docstring).
    """
    global _ORIGINAL
    with _LOCK:
        from ray.dag.dag_node import DAGNode

        if _ORIGINAL is None:
            _ORIGINAL = DAGNode.__dict__["experimental_compile"]
            DAGNode.experimental_compile = _experimental_compile  # type: ignore[method-assign]  # the patch
        if workers:
            _reach_workers()


def unpatch_ray() -> None:
    """Put Ray's own ``experimental_compile`` (and ``ray.init``) back. Idempotent."""
    global _ORIGINAL, _ORIGINAL_INIT, _SET_ENV
    with _LOCK:
        if _ORIGINAL is not None:
            from ray.dag.dag_node import DAGNode

            DAGNode.experimental_compile = _ORIGINAL  # type: ignore[method-assign]  # Ray's, back
            _ORIGINAL = None
        if _SET_ENV:
            os.environ.pop(ENV, None)
            _SET_ENV = False
        if _ORIGINAL_INIT is not None:
            import ray

            ray.init = _ORIGINAL_INIT
            _ORIGINAL_INIT = None


def is_patched() -> bool:
    """Whether ``experimental_compile`` is dagc's in this process."""
    return _ORIGINAL is not None


@contextlib.contextmanager
def patched(workers: bool = True):
    """``with dagc.patched_ray(): ...``: patched for the block; restores what was before."""
    was = is_patched()
    patch_ray(workers)
    try:
        yield
    finally:
        if not was:
            unpatch_ray()


# -- reaching Ray workers --------------------------------------------------------------------


def worker_setup_hook() -> None:
    """Ray ``worker_process_setup_hook`` (runtime_env): patch inside each worker process."""
    patch_ray(workers=False)


def _in_ray_worker() -> bool:
    try:
        from ray._private import worker as rw

        return rw.global_worker.mode == rw.WORKER_MODE
    except Exception:
        return False


def _reach_workers() -> None:
    global _ORIGINAL_INIT, _SET_ENV
    import ray

    if ENV not in os.environ:
        os.environ[ENV] = "1"  # a Ray started from here hands it to its workers
        _SET_ENV = True
    if ray.is_initialized():
        if not _in_ray_worker():
            warn_once(
                "workers",
                "Ray was initialised before patch_ray(): DAGs compiled "
                "inside actors of this job still use Ray's Compiled Graph (a job's "
                "runtime_env is fixed at ray.init). Call dagc.patch_ray() before "
                "ray.init(), or pass ray.init(runtime_env={'worker_process_setup_hook':"
                f" '{_HOOK}'}}).",
            )
        return
    if _ORIGINAL_INIT is not None:
        return
    original = ray.init

    @functools.wraps(original)
    def init(*args, **kwargs):
        if is_patched():
            env = _runtime_env_with_hook(kwargs.get("runtime_env"), kwargs.get("job_config"))
            if env is not None:
                kwargs["runtime_env"] = env
        return original(*args, **kwargs)

    _ORIGINAL_INIT = original
    ray.init = init


def _is_our_hook(hook) -> bool:
    return hook == _HOOK or hook is worker_setup_hook


def _runtime_env_with_hook(runtime_env, job_config):
    """The ``runtime_env=`` the patched ``ray.init`` passes: the one Ray would use for the
    job, in whichever form the user gave it, plus dagc's worker setup hook; or None to
    pass the call on unchanged.

    Ray's rules (ray 2.60, ``ray._private.worker.init``): a non-empty ``runtime_env=``
    (dict or ``RuntimeEnv``) replaces ``job_config.runtime_env``; under ``ray job submit``
    (``RAY_JOB_CONFIG_JSON_ENV_VAR``) the job's runtime_env is merged with
    ``runtime_env=`` and a field set in both is an error. So the hook is added to what
    would have been used, and never where it would collide. Ray runs one setup hook per
    job: when the user's job already has one, dagc's cannot also run, and that is said.
    """
    import copy
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR as JOB_VAR

    key = "worker_process_setup_hook"
    injected = os.environ.get(JOB_VAR)
    if injected is not None:  # a submitted job: ray.init's env is merged into it
        job_hook = (json.loads(injected).get("runtime_env") or {}).get(key)
        if job_hook is not None and (runtime_env or {}).get(key) is None:
            if not _is_our_hook(job_hook):
                _warn_own_hook(job_hook, "the submitted job's runtime_env")
            return None
        base, where = runtime_env or {}, "ray.init(runtime_env=...)"
    elif runtime_env:
        base, where = runtime_env, "ray.init(runtime_env=...)"
    elif job_config is not None and job_config.runtime_env:
        base, where = job_config.runtime_env, "JobConfig(runtime_env=...)"
    else:
        base, where = {}, ""
    hook = base.get(key)
    if hook is not None and not _is_our_hook(hook):
        _warn_own_hook(hook, where)
        return None
    merged = copy.copy(base) if base else {}
    merged[key] = _HOOK
    return merged


def _warn_own_hook(hook, where: str) -> None:
    name = hook if isinstance(hook, str) else getattr(hook, "__qualname__", repr(hook))
    warn_once(
        "hook",
        f"{where} sets worker_process_setup_hook={name}, and Ray runs one "
        f"setup hook per job, so dagc's ({_HOOK}) cannot also run: DAGs compiled "
        f"inside this job's actors keep Ray's Compiled Graph. To have both, call "
        f"{_HOOK}() from {name}, or call dagc.patch_ray() in the actors.",
    )


# -- DAGC_PATCH_RAY=1 ----------------------------------------------------------------------


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs ``callback()`` right after module ``target`` is first executed."""

    def __init__(self, target: str, callback):
        self.target = target
        self.callback = callback
        self._busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                try:
                    callback()
                except Exception:  # never break the user's import
                    logger.exception("dagc: post-import hook for %s failed", fullname)

        spec.loader = _Loader()
        return spec


def install_import_hook(target: str = "ray.dag", callback=None) -> None:
    """Run ``callback`` (default: patch) as soon as ``target`` is imported in this process
    (now, if it already is)."""
    callback = callback or (lambda: patch_ray(workers=not _in_ray_worker()))
    if target in sys.modules:
        callback()
        return
    if not any(isinstance(f, _PostImportFinder) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder(target, callback))


def env_requests_patch() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def autopatch_from_env() -> bool:
    """``DAGC_PATCH_RAY=1``: patch (once Ray's DAG API is imported). Returns whether."""
    if env_requests_patch():
        install_import_hook()
        return True
    return False


def main(argv=None) -> int:
    """``python -m dagc.ray_compat PROGRAM.py [ARGS...]``: run a program that never heard
    of dagc with the patch (``DAGC_PATCH_RAY=1`` for it and every process it starts)."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m dagc.ray_compat PROGRAM.py [ARGS...]\n"
            "runs PROGRAM with dag.experimental_compile() compiling with dagc",
            file=sys.stderr,
        )
        return 2
    os.environ[ENV] = "1"
    install_import_hook()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")
    return 0


def __getattr__(name):
    if name in ("RayCompiledDag", "RayDagRef", "RayDagFuture"):
        from dagc import ray_graph

        return getattr(ray_graph, name)
    raise AttributeError(f"module 'dagc.ray_compat' has no attribute {name!r}")


__all__ = [
    "patch_ray",
    "unpatch_ray",
    "patched",
    "is_patched",
    "worker_setup_hook",
    "map_compile_options",
    "install_import_hook",
    "autopatch_from_env",
    "RayCompiledDag",
    "RayDagRef",
    "RayDagFuture",
]


if __name__ == "__main__":
    # run as a script this file is __main__, a second copy: use the real module's state
    from dagc.ray_compat import main as _main

    sys.exit(_main())

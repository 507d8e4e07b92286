"""Import shims for running Ray's own Compiled Graph tests against dagc.

``tests/compat/run_ray_suite.py`` puts this folder first on ``PYTHONPATH``, so Python runs
this file at start-up in *every* process of the run: the pytest driver, the Ray workers (they
inherit the environment of the Ray the driver starts), and drivers the tests start as
subprocesses. It makes Ray's test file importable unchanged and fetches nothing:

* ``ray.tests.conftest``          -> ``tests/compat/conftest.py`` (dagc's fixture stand-ins)
* ``ray.dag.tests.experimental``  -> a package over ``$DAGC_RAY_TESTS`` (Ray's actor_defs.py)
* ``ray._private.test_utils.run_string_as_driver`` -> ``ray._common.test_utils``'s, where
  the installed Ray moved it (the stored test file imports the old place)
* ``$DAGC_RAY_TESTS`` appended to ``sys.path``, so workers can import the test module that
  defines actor classes used by reference (``FastFailActor``, ``TestWorker``)
* ``DAGC_PATCH_RAY=1``: ``dagc.ray_compat`` patches ``experimental_compile`` as soon as
  ``ray.dag`` is imported, in every process (DAGs compiled inside actors too).

Nothing here imports Ray or dagc; processes that never import these names (Ray's own
helper processes) pay nothing.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFTEST = os.path.join(os.path.dirname(_HERE), "conftest.py")
_RAY_TESTS = os.environ.get("DAGC_RAY_TESTS", "")


class _Package(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


class _RayTestsFinder(importlib.abc.MetaPathFinder):
    PACKAGES = {
        "ray.tests": [],
        "ray.dag.tests": [],
        "ray.dag.tests.experimental": [_RAY_TESTS] if _RAY_TESTS else [],
    }

    def find_spec(self, fullname, path, target=None):
        if fullname == "ray.tests.conftest":
            return importlib.util.spec_from_file_location(fullname, _CONFTEST)
        locations = self.PACKAGES.get(fullname)
        if locations is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _Package(), is_package=True)
        spec.submodule_search_locations = list(locations)
        return spec


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback()`` right after module ``target`` is first executed."""

    def __init__(self, target, callback):
        self.target, self.callback, self.busy = target, callback, False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        inner, callback = spec.loader, self.callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                try:
                    callback()
                except Exception as e:  # never break the import itself
                    print(f"[dagc shim] after importing {fullname}: {e!r}", file=sys.stderr)

        spec.loader = _Loader()
        return spec


def _alias_run_string_as_driver():
    mod = sys.modules.get("ray._private.test_utils")
    if mod is not None and not hasattr(mod, "run_string_as_driver"):
        from ray._common.test_utils import run_string_as_driver

        mod.run_string_as_driver = run_string_as_driver


def _patch():
    from dagc import ray_compat  # importing dagc with DAGC_PATCH_RAY=1 patches

    ray_compat.autopatch_from_env()


def _install():
    sys.meta_path.insert(0, _RayTestsFinder())
    if _RAY_TESTS and _RAY_TESTS not in sys.path:
        sys.path.append(_RAY_TESTS)
    sys.meta_path.insert(0, _AfterImport("ray._private.test_utils", _alias_run_string_as_driver))
    if os.environ.get("DAGC_PATCH_RAY", "") == "1":
        sys.meta_path.insert(0, _AfterImport("ray.dag", _patch))


_install()

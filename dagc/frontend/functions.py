"""Function nodes (``f.bind(...)`` of a ``@ray.remote`` function) as calls on actors.

Ray Compiled Graph runs actor methods only. dagc runs each function node on an actor of its
own that it creates when the DAG is loaded and kills when the DAG is released
(``dagc/runtime/actor/function_host.py``). Tracing touches nothing: a function node becomes
a call on a *function actor*, an actor id like any other ("a2", labelled with the function's
name: "a2:load"), whose side-table entry is a :class:`FunctionActor` (what to create) until
the DAG is loaded. One actor per node, so branches that Ray tasks would run in parallel stay
parallel.

The node's Ray options (the function's ``@ray.remote(...)`` ones and any ``.options(...)``
given before ``bind``) become the actor's; see :func:`actor_options` for the mapping.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any

from dagc.errors import CompileError

# Task options an actor has no use for, and why they are dropped (docs/ray_compat.md).
_DROPPED = {
    # Ray sets max_calls=1 for GPU tasks so that the worker exits and frees GPU memory; the
    # actor lives as long as the DAG, which holds its GPU till then
    "max_calls",
    # a compiled DAG does not retry: a function's exception is that execution's TaskError
    # (the DAG goes on), a dead function actor ends the DAG like any actor's death
    "max_retries",
    "retry_exceptions",
    # a task's display name; as an actor option it would make a named (global) actor
    "name",
    # checked by trace (one return, no generators); nothing for the actor
    "num_returns",
    "_generator_backpressure_num_objects",
    "_num_objects_per_yield",
}

_NOT_IDENT = re.compile(r"\W")


@dataclass(frozen=True)
class FunctionActor:
    """A function node's actor before the DAG is loaded: what load() creates for it.

    ``fn`` is the user's function (the ``@ray.remote``'s body), ``method`` the name the
    generated loop calls it by, ``options`` the actor options (:func:`actor_options`),
    ``task_options`` the node's Ray options as given, ``where`` where the function is
    written ("etl.py:12 load"), for comments and errors.
    """

    fn: Any = field(compare=False)
    method: str
    options: dict = field(compare=False)
    task_options: dict = field(compare=False)
    where: str = ""

    def __repr__(self) -> str:
        return f"<dagc function actor for {self.method}(), not created yet>"


def is_function_actor(handle) -> bool:
    """Whether a side-table handle stands for a function actor not created yet."""
    return isinstance(handle, FunctionActor)


def function_actor(node, describe) -> FunctionActor:
    """The :class:`FunctionActor` of a Ray ``FunctionNode``, or a CompileError saying why
    the node cannot run on one."""
    fn = node._body
    name = getattr(fn, "__name__", "function")
    opts = dict(node.get_options() or {})
    what = describe(node)
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise CompileError(
            f"{what}: a generator function cannot be a node of a compiled DAG (its results "
            f"stream; a compiled DAG passes one value per execution). Return a list, or "
            f"call the generator inside a plain function."
        )
    if inspect.iscoroutinefunction(fn):  # Ray refuses these at @ray.remote; be sure
        raise CompileError(
            f"{what}: an async function cannot be a function node; wrap it "
            f"in a plain function (asyncio.run(...))."
        )
    n = opts.get("num_returns", 1)
    if n != 1:
        raise CompileError(
            f"{what}: num_returns={n!r} is not supported for function nodes (a Ray "
            f"function node has no per-return nodes to bind); return a tuple and index it "
            f"in the next node, or use an actor method with num_returns."
        )
    return FunctionActor(
        fn=fn,
        method=method_name(name),
        options=actor_options(opts),
        task_options=opts,
        where=defined_at(fn),
    )


def method_name(name: str) -> str:
    """The name the loop calls the function by: an identifier (``<lambda>`` -> ``_lambda_``),
    never a dunder (it is an attribute of the host actor)."""
    out = _NOT_IDENT.sub("_", name) or "function"
    if out[0].isdigit() or out.startswith("__"):
        out = "fn_" + out.lstrip("_")
    return out


def actor_options(task_options: dict) -> dict:
    """A function node's Ray task options as the options of the actor that runs it.

    Resource and placement options (``num_gpus``, ``resources``, ``memory``,
    ``accelerator_type``, ``scheduling_strategy``, ``runtime_env``, ``label_selector``,
    ...) pass as given and are held for the DAG's life. ``num_cpus`` passes when given; when
    not, the actor takes Ray's actor default (1 CPU to be placed, none held while it runs)
    rather than a task's (1 CPU held while it runs): a DAG's function actors all live at
    once, so ten unannotated functions hold no CPUs and fit a 2-CPU node, as ten actors do.
    Retry and per-call options are dropped (``_DROPPED``)."""
    return {k: v for k, v in task_options.items() if k not in _DROPPED}


def defined_at(fn, cwd: str | None = None) -> str:
    """Where ``fn`` is written, "etl.py:12 load" (the file relative to ``cwd`` when below
    it), as the probe reports actor methods; "" when that cannot be told."""
    try:
        fn = inspect.unwrap(fn)
        code = fn.__code__
        path = code.co_filename
        rel = os.path.relpath(path, cwd or os.getcwd())
        if not rel.startswith(os.pardir + os.sep):
            path = rel
        return f"{path}:{code.co_firstlineno} {getattr(fn, '__qualname__', fn.__name__)}"
    except Exception:
        return ""

"""mkdocs hook (mkdocs.yml): the API reference covers the public API, all documented.

mkdocstrings fails the strict build on a ``::: path`` that no longer resolves; this adds
what it cannot see: a name in ``dagc.__all__`` that docs/api.md does not document, a
public name without a docstring of its own, and a ``dagc.compile`` option missing from
the contract's table. Each is a warning, which ``--strict`` turns into a failed build.
"""

import importlib
import logging
import re

log = logging.getLogger("mkdocs.plugins.dagc_docs")


def _resolve(path: str):
    module, _, rest = path.partition(".")
    obj = importlib.import_module(module)
    for part in rest.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def _own_doc(obj) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if isinstance(obj, type) and doc and doc.startswith(obj.__name__ + "("):
        return ""  # the signature a dataclass makes up, not a docstring
    return (doc or "").strip()


def _check_api(markdown: str) -> None:
    import dagc

    documented = []
    for path in re.findall(r"^::: ([\w.]+)\s*$", markdown, re.M):
        try:
            documented.append(_resolve(path))
        except (ImportError, AttributeError):
            log.warning("docs/api.md: %s does not exist (renamed?)", path)
    headed = set(re.findall(r"^#+ `dagc\.(\w+)`\s*$", markdown, re.M))  # Ray's classes
    for name in dagc.__all__:
        obj = getattr(dagc, name)
        ours = obj.__module__.startswith("dagc")
        if ours and not any(obj is d for d in documented):
            log.warning("docs/api.md: dagc.%s is public (dagc.__all__) but not documented", name)
        elif not ours and name not in headed:
            log.warning("docs/api.md: dagc.%s (from %s) has no entry", name, obj.__module__)
        if ours and not _own_doc(obj):
            log.warning("dagc.%s has no docstring", name)


def _check_options(markdown: str) -> None:
    from dagc.options import DEFAULTS

    for option in (k for k in DEFAULTS if not k.startswith("_")):
        if not re.search(rf"^\| `{option}` \|", markdown, re.M):
            log.warning("docs/contract.md: option %s is not in the options table", option)


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri == "api.md":
        _check_api(markdown)
    elif page.file.src_uri == "contract.md":
        _check_options(markdown)
    return markdown

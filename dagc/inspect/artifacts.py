"""The inspection artifacts of a compiled DAG, written to and read back from a directory.

``write_artifacts(dir, ...)`` writes::

    DIR/
      driver.py  a0.py  a1.py ...   each generated module, named by actor id
      schedule.txt                  str(schedule): the Step x Actor table and channels
      schedule.json                 Schedule.to_json(): the exact, reloadable form
      schedule.csv                  Schedule.to_csv()
      graph.dot                     the dataflow graph (dagc.inspect.graph.to_dot)
      trace.json                    Chrome trace (only when a trace is given)

Every file is UTF-8 with "\\n" line ends and one trailing newline, and depends only on its
inputs, so the same DAG compiled twice gives byte-identical files. Nothing else in the
directory is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagc.errors import DagcError
from dagc.inspect.graph import to_dot
from dagc.schedule import Schedule


class ArtifactsError(DagcError):
    """An artifacts directory is missing, incomplete or unreadable."""


def _text(s: str) -> bytes:
    return (s if s.endswith("\n") else s + "\n").encode("utf-8")


def _module_filename(actor: str) -> str:
    name = f"{actor}.py"
    if not actor or os.sep in actor or "/" in actor or actor.startswith("."):
        raise ValueError(
            f"generated module key {actor!r} is not a plain actor id "
            f"(expected names like 'a0' or 'driver')"
        )
    return name


def artifact_files(
    schedule: Schedule, sources: dict[str, str], trace: dict | None = None
) -> dict[str, bytes]:
    """File name -> exact bytes of every artifact, in a stable order (see module doc)."""
    files = {_module_filename(a): _text(sources[a]) for a in sorted(sources)}
    files["schedule.txt"] = _text(str(schedule))
    files["schedule.json"] = _text(schedule.to_json())
    files["schedule.csv"] = _text(schedule.to_csv())
    files["graph.dot"] = _text(to_dot(schedule))
    if trace is not None:
        files["trace.json"] = _text(json.dumps(trace, indent=1, sort_keys=True, ensure_ascii=False))
    return files


def write_artifacts(
    dir: str | os.PathLike, schedule: Schedule, sources: dict[str, str], trace: dict | None = None
) -> list[Path]:
    """Write the artifacts into ``dir`` (created if needed); returns the paths written."""
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in artifact_files(schedule, sources, trace).items():
        path = root / name
        path.write_bytes(data)
        written.append(path)
    return written


def load_schedule(dir: str | os.PathLike) -> Schedule:
    """The Schedule stored in ``dir/schedule.json``; ArtifactsError if absent or broken."""
    path = Path(dir) / "schedule.json"
    if not path.is_file():
        where = "does not exist" if not Path(dir).exists() else "has no schedule.json"
        raise ArtifactsError(
            f"{dir} {where}, so there is no schedule to show. Write the artifacts first "
            f"with `dagc compile FILE -o {dir}` or `cg.dump({str(dir)!r})`."
        )
    try:
        return Schedule.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactsError(
            f"{path} is not a dagc schedule ({type(e).__name__}: {e}); "
            f"write it again with `dagc compile ... -o` or "
            f"`cg.dump(...)`."
        ) from e


def show(dir: str | os.PathLike) -> str:
    """The Step x Actor table and channels of the schedule in ``dir``: ``str(schedule)``."""
    return str(load_schedule(dir))

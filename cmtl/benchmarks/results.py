"""The files a benchmark script leaves in its output folder: ``results.json`` (every number) and
``results.md`` (the tables), written atomically (:func:`cmtl._io.write_bytes_atomic`): a run stopped
mid-write, or a reader watching the folder, sees the previous file or the new one, never a part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmtl._io import write_bytes_atomic


def write_results(out: str | Path, results: dict[str, Any], markdown: str | None = None, *,
                  name: str = "results") -> None:
    """Write ``out/<name>.json`` (``results`` as JSON indented by 2, and a newline) and, when ``markdown``
    is given, ``out/<name>.md`` (``markdown`` and a newline). Both UTF-8; ``out`` must exist.

    A script that saves as it goes calls it with ``results`` alone after each step, then once more with
    the markdown at the end.
    """
    out = Path(out)
    write_bytes_atomic(out / f"{name}.json", (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    if markdown is not None:
        write_bytes_atomic(out / f"{name}.md", (markdown + "\n").encode("utf-8"))


def check_same_run(out: str | Path, settings: dict[str, Any], *, key: str | None = "settings",
                   name: str = "results") -> None:
    """Refuse to write into ``out`` when its ``<name>.json`` holds a run made with other ``settings``: writing
    would replace that run's results. The same run again may replace them, and a file that recorded no settings
    (``key`` absent) is not judged. With ``key=None`` the settings are the file's top-level entries.

    Raises:
        FileExistsError: a setting differs; the message names it, stored and now.
    """
    path = Path(out) / f"{name}.json"
    if not path.exists():
        return
    stored = json.loads(path.read_text(encoding="utf-8"))
    stored = stored if key is None else stored.get(key)
    if stored is None:
        return
    now = json.loads(json.dumps(settings))
    changed = {}
    for k in sorted(set(now) if key is None else set(now) | set(stored)):
        before, after = stored.get(k), now.get(k)
        if isinstance(before, dict) and isinstance(after, dict):  # name the nested entries that differ
            changed |= {f"{k}.{s}": (before.get(s), after.get(s)) for s in sorted(set(before) | set(after))
                        if before.get(s) != after.get(s)}
        elif before != after:
            changed[k] = (before, after)
    if changed:
        raise FileExistsError(f"{path} holds the results of a run with other settings {changed} (stored, now): "
                              "writing would replace them. Pass another --out, or move that folder.")

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

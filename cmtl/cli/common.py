"""What the CLI's commands share: argument types and the table printer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RegistryArg = Annotated[Path, typer.Argument(help="Registry folder.")]
TaskArg = Annotated[str, typer.Argument(help="Task name.")]
EncodingOpt = Annotated[Optional[str], typer.Option(
    help="Text encoding of the data files, e.g. latin-1 or cp1252 (default: UTF-8).")]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table with a header and aligned columns."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])

"""What the config dataclasses share when they are read back from a stored dict."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def known_keys(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls``: a record written by a newer cmtl
    may hold keys this one does not know (the manifest check reports those, see cmtl.registry.manifest)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}

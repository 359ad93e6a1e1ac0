"""The registry: the public facade, its manifest, its on-disk store and the loaded entries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtl import _lazy

_EXPORTS = {"Registry": "cmtl.registry.facade", "UpdateResult": "cmtl.registry.reader",
            "VersionInfo": "cmtl.registry.reader"}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from cmtl.registry.facade import Registry
    from cmtl.registry.reader import UpdateResult, VersionInfo

__all__ = ["Registry", "UpdateResult", "VersionInfo"]

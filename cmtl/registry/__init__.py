"""The registry: the public facade, its manifest, its on-disk store and the loaded entries."""

from cmtl.registry.facade import Registry
from cmtl.registry.reader import UpdateResult, VersionInfo

__all__ = ["Registry", "UpdateResult", "VersionInfo"]

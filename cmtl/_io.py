"""Atomic, durable writes: what every file cmtl writes goes through (registry, buffers, results)."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: What ``fsync`` on a folder raises where the file system cannot flush folders (some network and FUSE
#: mounts): the flush is skipped there, as the file system offers nothing stronger.
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def fsync_dir(path: Path) -> None:
    """Flush the entries of the folder ``path`` (a new name in it, a rename into it) to disk.

    Skipped on Windows, where a folder cannot be opened, and on file systems that cannot flush one.

    Raises:
        OSError: the flush failed (an I/O error, a full disk).
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def settle_dir(path: Path, written: Path) -> None:
    """:func:`fsync_dir` after ``written`` was renamed into ``path``: the write has landed by then (every
    reader sees it), so a failed flush is a warning, not an error that would tell the caller it failed."""
    try:
        fsync_dir(path)
    except OSError as e:
        warnings.warn(f"{str(written)!r} was written, but its folder could not be flushed to disk ({e}); a crash "
                      "of the machine before the file system flushes it could lose the write.", RuntimeWarning,
                      stacklevel=3)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "xb") as f:  # exclusive: never opens (and follows) something already there
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    settle_dir(path.parent, path)


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as save_safetensors  # here: the manifest-only CLI never imports torch

    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})

"""cmtl._io: the atomic write every file cmtl writes goes through, and tensors to safetensors bytes."""

from __future__ import annotations

import hashlib
import os
import uuid
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as load_safetensors

import cmtl._io as io_module
from cmtl._io import sha256_bytes, tensors_to_bytes, write_bytes_atomic


def test_write_creates_and_replaces_leaving_no_temp_file(tmp_path):
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


class Unwritable:
    """Data that fails once the file is open: a write that dies between opening and renaming."""


def test_a_write_that_dies_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, Unwritable())  # an in-place write would have truncated the file by now
    assert target.read_bytes() == b"old"  # old or new, never a part (a SIGKILL mid-write: test_store_safety.py)


def test_the_temp_file_is_never_opened_through_something_already_there(tmp_path, monkeypatch):
    """A file or link planted at the temp name is not written through (exclusive create)."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    fixed = uuid.UUID(int=0xC0FFEE)
    monkeypatch.setattr(io_module, "uuid", SimpleNamespace(uuid4=lambda: fixed))  # cmtl._io's name only
    target = tmp_path / "f.bin"
    os.symlink(victim, tmp_path / f".f.bin.{fixed.hex}.tmp")
    with pytest.raises(FileExistsError):
        write_bytes_atomic(target, b"new")
    assert victim.read_bytes() == b"precious" and not target.exists()


def test_sha256_bytes_is_hashlibs():
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_tensors_to_bytes_round_trips_any_tensor_on_the_cpu():
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "grad": torch.ones(2, requires_grad=True) * 2, "half": base.half()}  # non-contiguous
    data = tensors_to_bytes(tensors)
    assert data == tensors_to_bytes(tensors)  # same tensors, same bytes: checksums are stable
    loaded = load_safetensors(data)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        torch.testing.assert_close(loaded[k], v.detach(), rtol=0, atol=0)
        assert loaded[k].dtype == v.dtype


def _fail_folder_fsync(monkeypatch, code: int):
    """``os.fsync`` raising ``OSError(code)`` on folders only, as a failing or unsupporting file system would."""
    import stat

    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_folder_flush_after_the_rename_warns_and_does_not_say_the_write_failed(tmp_path, monkeypatch):
    # The file is in place once renamed: raising then told callers a write had failed that every reader sees.
    import errno

    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"old")
    _fail_folder_fsync(monkeypatch, errno.EIO)
    with pytest.warns(RuntimeWarning, match="was written, but its folder could not be flushed"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_a_file_system_that_cannot_flush_folders_is_no_error(tmp_path, monkeypatch, recwarn):
    import errno

    _fail_folder_fsync(monkeypatch, errno.EINVAL)  # what some network and FUSE mounts answer
    write_bytes_atomic(tmp_path / "f.bin", b"x")
    io_module.fsync_dir(tmp_path)
    assert (tmp_path / "f.bin").read_bytes() == b"x" and not recwarn.list

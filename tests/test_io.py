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

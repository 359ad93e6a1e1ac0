"""cmtl.registry.store as units: the layout, manifest reads and writes (old or new, never a part),
checked file reads, folder writes and the writer lock. (Hostile trees: test_store_safety.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from cmtl import CorruptFileError, RegistryError
from cmtl._io import sha256_bytes, tensors_to_bytes
from cmtl.registry import store


@pytest.fixture
def root(registry):
    """A fresh registry folder (its manifest written by Registry.create)."""
    return registry.root


def test_layout_paths(tmp_path):
    assert store.version_dir(tmp_path, "spam", 3) == tmp_path / "tasks" / "spam" / "v3"
    assert store.merge_dir(tmp_path, "both") == tmp_path / "merges" / "both"
    assert store.MANIFEST == "registry.json"


def test_write_manifest_bumps_the_generation_and_reads_back(root):
    manifest = store.read_manifest(root)
    generation = manifest["generation"]
    manifest["tasks"] = {}
    store.write_manifest(root, manifest)
    again = store.read_manifest(root)
    assert again["generation"] == generation + 1 and again == manifest
    text = (root / store.MANIFEST).read_text()
    assert text == json.dumps(again, indent=2, sort_keys=True) + "\n"


def test_a_manifest_write_that_dies_leaves_the_old_manifest(root):
    """Dies while serialising, after the first keys (json.dump streams): an in-place write would have
    truncated the manifest by then. A SIGKILL at every step of every verb: test_store_safety.py."""
    before = (root / store.MANIFEST).read_bytes()
    manifest = store.read_manifest(root)
    manifest["zz_unserialisable"] = object()  # sorted last
    with pytest.raises(TypeError):
        store.write_manifest(root, manifest)
    assert (root / store.MANIFEST).read_bytes() == before
    assert store.read_manifest(root)["generation"] == json.loads(before)["generation"]


def test_read_manifest_refuses_what_is_not_a_registry(tmp_path, root):
    with pytest.raises(RegistryError, match="No registry at .* registry.json is missing"):
        store.read_manifest(tmp_path / "empty")
    manifest = json.loads((root / store.MANIFEST).read_text())
    (root / store.MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(RegistryError, match="has format 99; this cmtl .* reads format 1"):
        store.read_manifest(root)
    (root / store.MANIFEST).write_text("{ not json")
    with pytest.raises(RegistryError, match="is not valid JSON"):
        store.read_manifest(root)


def test_tensors_read_back_in_one_order_on_every_read(tmp_path):
    """safetensors' ``load`` of bytes lists the keys in a different order on each call; a stored file must
    read back the same way every time (code that iterates a state dict then gives the same answer)."""
    path = tmp_path / "adapter.safetensors"
    data = tensors_to_bytes({f"layer.{i}.lora_A.weight": torch.full((2,), float(i)) for i in range(12)})
    path.write_bytes(data)
    names = sorted(f"layer.{i}.lora_A.weight" for i in range(12))
    for _ in range(5):
        assert list(store.read_tensors(path, sha256_bytes(data))) == names
        assert list(store.load_tensors(data)) == names


def test_read_checked_returns_the_bytes_or_raises_corrupt_file(tmp_path):
    path = tmp_path / "adapter.safetensors"
    data = tensors_to_bytes({"w": torch.arange(6.0)})
    path.write_bytes(data)
    digest = sha256_bytes(data)
    assert store.read_checked(path, digest) == data
    torch.testing.assert_close(store.read_tensors(path, digest)["w"], torch.arange(6.0))
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(CorruptFileError, match=rf"corrupt or truncated: SHA-256 .* does not match the manifest's "
                                               rf"{digest[:12]}"):
        store.read_checked(path, digest)
    path.unlink()
    with pytest.raises(CorruptFileError, match="named in the manifest is missing"):
        store.read_checked(path, digest)


def test_write_folder_puts_every_file_in_place_with_its_checksum(root):
    final = store.version_dir(root, "t", 1)
    files = {"adapter.safetensors": b"aaa", "head.safetensors": b"hh"}
    sums = store.write_folder(root, final, files)
    assert sums == {name: sha256_bytes(data) for name, data in files.items()}
    assert {p.name: p.read_bytes() for p in final.iterdir()} == files
    assert not list(final.parent.glob(".staging-*"))
    again = store.write_folder(root, final, {"adapter.safetensors": b"new"})  # a crash leftover is replaced whole
    assert [p.name for p in final.iterdir()] == ["adapter.safetensors"] and again["adapter.safetensors"] == \
        sha256_bytes(b"new")


def test_writer_lock_admits_one_writer_at_a_time(root):
    with store.writer_lock(root):
        with pytest.raises(RegistryError, match="is locked by another writer"):
            with store.writer_lock(root, timeout=0.1):
                pass
    with store.writer_lock(root, timeout=0.1):  # released on exit
        pass
    with pytest.raises(ValueError, match="inside"):
        with store.writer_lock(root):
            raise ValueError("inside")
    with store.writer_lock(root, timeout=0.1):  # released on an error too
        pass

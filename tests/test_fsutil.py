"""One atomic writer, one cache root, one file hash (finetune_sdk.fsutil)."""

from __future__ import annotations

import hashlib

import pytest

from finetune_sdk import fsutil
from finetune_sdk.registry.blobs import BlobStore


def test_atomic_path_keeps_the_old_file_and_leaves_nothing_on_an_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_path_replaces_whole_with_shareable_permissions(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    with fsutil.atomic_path(target, suffix=".partial") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".partial")
        tmp.write_bytes(b"x" * 10)
    assert target.read_bytes() == b"x" * 10
    assert target.stat().st_mode & 0o777 == 0o666 & ~fsutil.current_umask()
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_SDK_CACHE", str(tmp_path / "c"))
    assert fsutil.cache_root() == tmp_path / "c"
    monkeypatch.delenv("FINETUNE_SDK_CACHE")
    assert fsutil.cache_root().parts[-2:] == (".cache", "finetune_sdk")


def test_one_hash_function_shared_by_registry_and_checkpoints(tmp_path):
    import finetune_sdk.training.checkpoints as checkpoints
    import finetune_sdk.registry.blobs as blobs

    path = tmp_path / "a"
    path.write_bytes(b"abc" * 1000)
    assert fsutil.sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert blobs.sha256_file is fsutil.sha256_file
    assert "registry" not in checkpoints.__dict__  # checkpoints no longer borrow from the registry


def test_blob_store_stores_once_and_atomically(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    source = tmp_path / "w.safetensors"
    source.write_bytes(b"weights")
    sha, size = store.put(source)
    assert (sha, size) == (hashlib.sha256(b"weights").hexdigest(), 7)
    assert store.put(source) == (sha, size)
    assert [p.name for p in store.path(sha).parent.iterdir()] == [sha]
    store.verify(sha, "w")

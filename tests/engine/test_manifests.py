"""File digests and manifests: one implementation (ft.engine.cache) serves the prepared-data cache and checkpoints.

The two digest forms are on disk (manifests written by earlier runs are checked against them), so their
exact values are pinned here: the full form is a content key (an edit anywhere changes it); the sampled
form checks large checkpoint files quickly beside their size and may miss an edit between its blocks.
"""

from __future__ import annotations

import json

import pytest
import xxhash

from ft.engine import cache
from ft.engine.cache import file_digest, write_manifest
from ft.engine.checkpoints import MANIFEST_FILE, verify, write_checkpoint_manifest


def test_the_full_digest_is_xxh3_128_of_every_byte(tmp_path):
    data = bytes(range(256)) * 1000
    file = tmp_path / "f.bin"
    file.write_bytes(data)
    assert file_digest(file) == xxhash.xxh3_128(data).hexdigest()


def test_the_sampled_digest_hashes_a_small_file_whole_and_a_large_one_in_blocks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 1000
    file = tmp_path / "f.bin"
    file.write_bytes(data)
    assert file_digest(file, sampled=True) == "xxh3:" + xxhash.xxh3_64(data).hexdigest()

    monkeypatch.setattr(cache, "FULL_DIGEST_BYTES", 4096)
    monkeypatch.setattr(cache, "SAMPLE_BYTES", 100)
    starts = [(len(data) - 100) * i // (cache.SAMPLES - 1) for i in range(cache.SAMPLES)]
    blocks = b"".join(data[s:s + 100] for s in starts)
    assert file_digest(file, sampled=True) == "sampled-xxh3:" + xxhash.xxh3_64(blocks).hexdigest()

    full, sampled = file_digest(file), file_digest(file, sampled=True)
    between = starts[1] - 1  # a byte no block reads: the size stays, only the full digest sees the edit
    edited = bytearray(data)
    edited[between] ^= 0xFF
    file.write_bytes(bytes(edited))
    assert file_digest(file, sampled=True) == sampled
    assert file_digest(file) != full
    edited[starts[1]] ^= 0xFF  # inside a block: both see it
    file.write_bytes(bytes(edited))
    assert file_digest(file, sampled=True) != sampled


def test_the_cache_manifest_lists_full_digests_and_leaves_stats_out(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "data.arrow").write_bytes(b"rows")
    (tmp_path / "stats.json").write_text("{}")
    write_manifest(tmp_path)
    manifest = json.loads((tmp_path / cache.MANIFEST).read_text())
    assert manifest == {"format": cache.CACHE_FORMAT,
                        "files": {"train/data.arrow": {"size": 4, "digest": xxhash.xxh3_128(b"rows").hexdigest()}}}
    assert cache.verify_manifest(tmp_path) == []


def test_the_checkpoint_manifest_lists_sampled_digests_and_verifies(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    write_checkpoint_manifest(tmp_path, 3)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["step"] == 3 and manifest["written_by"].startswith("ft ")
    weights = {"size": 7, "digest": "xxh3:" + xxhash.xxh3_64(b"weights").hexdigest()}
    assert manifest["files"]["model.safetensors"] == weights
    assert set(manifest["files"]) == {"trainer_state.json", "model.safetensors"}
    assert verify(tmp_path) == []
    (tmp_path / "model.safetensors").write_bytes(b"weightS")
    assert verify(tmp_path) == ["model.safetensors is damaged (its content changed since it was written)"]


@pytest.mark.parametrize("sampled", [False, True])
def test_a_manifest_written_before_the_merge_still_verifies(tmp_path, sampled):
    """Digests as ft.engine.checkpoints and ft.engine.cache computed them before they shared one function."""
    (tmp_path / "trainer_state.json").write_bytes(b"{}")
    if sampled:
        files = {"trainer_state.json": {"size": 2, "digest": "xxh3:" + xxhash.xxh3_64(b"{}").hexdigest()}}
        (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": 1, "step": 1, "files": files}))
        assert verify(tmp_path) == []
    else:
        files = {"trainer_state.json": {"size": 2, "digest": xxhash.xxh3_128(b"{}").hexdigest()}}
        (tmp_path / cache.MANIFEST).write_text(json.dumps({"format": cache.CACHE_FORMAT, "files": files}))
        assert cache.verify_manifest(tmp_path) == []


def test_cache_and_checkpoint_files_are_checked_alike_and_worded_as_before(tmp_path):
    ckpt, cache_dir = tmp_path / "checkpoint-1", tmp_path / "key"
    for path in (ckpt, cache_dir):
        path.mkdir()
        (path / "trainer_state.json").write_text("{}")
        (path / "a.bin").write_bytes(b"abc")
        (path / "b.bin").write_bytes(b"xyz")
    write_checkpoint_manifest(ckpt, 1)
    write_manifest(cache_dir)
    for path in (ckpt, cache_dir):
        (path / "a.bin").unlink()
        (path / "b.bin").write_bytes(b"xyzw")
    assert verify(ckpt) == ["a.bin is missing", "b.bin has 4 bytes, 3 were written"]
    assert sorted(cache.verify_manifest(cache_dir)) == ["a.bin is missing", "b.bin has 4 bytes, 3 were written"]
    (ckpt / "b.bin").write_bytes(b"xyz")
    (cache_dir / "b.bin").write_bytes(b"xyz")
    (ckpt / "trainer_state.json").write_text("[]")
    (cache_dir / "trainer_state.json").write_text("[]")
    assert verify(ckpt) == ["a.bin is missing",
                            "trainer_state.json is damaged (its content changed since it was written)"]
    assert sorted(cache.verify_manifest(cache_dir)) == ["a.bin is missing",
                                                         "trainer_state.json changed since it was written"]

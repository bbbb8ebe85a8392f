"""Component fingerprints (engine/weights/fingerprint.py): the same values as hashing every file, kept in a sidecar
so a later start reads no file that did not change, and re-hashes the ones that did."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from engine.weights import fingerprint as fp


def full_hash(path: Path) -> str:
    """The fingerprint as it was computed before the sidecar: every file read, every start."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(hashlib.sha256(file.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


@pytest.fixture
def component(tmp_path) -> Path:
    vae = tmp_path / "model" / "vae"
    (vae / "sub").mkdir(parents=True)
    (vae / "config.json").write_text('{"channels": 4}')
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(64 * 1024))
    (vae / "sub" / "extra.bin").write_bytes(b"x" * 100)
    return vae


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files read and hashed, from a fresh process's point of view (no in-process cache)."""
    monkeypatch.setattr(fp, "_HASH_CACHE", {})
    seen: list[Path] = []
    real = fp.hash_file

    def counting(file: Path) -> str:
        seen.append(file)
        return real(file)

    monkeypatch.setattr(fp, "hash_file", counting)
    return seen


def new_process(seen: list[Path]) -> None:
    fp._HASH_CACHE.clear()
    seen.clear()


def test_the_value_is_the_full_hash_and_a_later_start_reads_no_file(component, hashed):
    before = full_hash(component)
    assert fp.component_fingerprint(component) == before
    assert len(hashed) == 3
    assert fp.sidecar_path(component).is_file() and not any(p.name.endswith(".json") and p.name.startswith(".")
                                                            for p in component.rglob("*"))
    new_process(hashed)
    assert fp.component_fingerprint(component) == before  # from the sidecar
    assert hashed == []
    assert full_hash(component) == before  # the sidecar beside the folder is not part of it


def test_a_rewrite_with_the_same_size_and_mtime_is_hashed_again(component, hashed):
    weights = component / "diffusion_pytorch_model.safetensors"
    old = fp.component_fingerprint(component)
    st = weights.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick: the rewrite gets a later ctime
    weights.write_bytes(os.urandom(st.st_size))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` or rsync -t would leave it
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    new_process(hashed)
    new = fp.component_fingerprint(component)
    assert new == full_hash(component) != old
    assert hashed == [weights]  # only the changed file is read


def test_a_touched_file_or_one_swapped_in_by_rename_is_hashed_again(component, hashed):
    config = component / "config.json"
    fp.component_fingerprint(component)
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    new_process(hashed)
    assert fp.component_fingerprint(component) == full_hash(component)
    assert hashed == [config]

    extra = component / "sub" / "extra.bin"
    st = extra.stat()
    other = component.parent / "other.bin"
    other.write_bytes(b"y" * 100)  # same size, same mtime, another inode
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, extra)
    new_process(hashed)
    assert fp.component_fingerprint(component) == full_hash(component)
    assert hashed == [extra]


def test_an_added_file_changes_the_value_and_only_it_is_read(component, hashed):
    old = fp.component_fingerprint(component)
    (component / "added.txt").write_text("new")
    new_process(hashed)
    assert fp.component_fingerprint(component) == full_hash(component) != old
    assert [p.name for p in hashed] == ["added.txt"]


def test_an_unwritable_or_broken_sidecar_falls_back_to_hashing(component, hashed):
    fp.sidecar_path(component).write_text("{not json")
    assert fp.component_fingerprint(component) == full_hash(component)
    fp.sidecar_path(component).unlink()
    fp.sidecar_path(component).mkdir()  # the rename onto it fails, as in a folder the worker cannot write
    for _ in range(2):
        new_process(hashed)
        assert fp.component_fingerprint(component) == full_hash(component)
        assert len(hashed) == 3
    assert fp.component_fingerprint(component.parent / "absent") is None

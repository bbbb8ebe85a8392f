"""Where models come from and how a download is fetched whole. The hub is the boundary: a small
in-memory stand-in serves its two calls (file listing with sizes/sha256, snapshot download)."""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

import pytest

from engine.weights import model_sources
from engine.weights.model_sources import MAIN_REPO, download, source_for


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = "c0ffee" * 6 + "abcd"):
        self.repos, self.commit, self.snapshots = repos, commit, []

    def files(self, repo, revision):
        big = lambda data: hashlib.sha256(data).hexdigest() if len(data) > 100 else None  # noqa: E731
        return self.commit, {p: (len(d), big(d)) for p, d in self.repos[repo].items()}

    def snapshot(self, repo_id, revision, allow_patterns, local_dir):
        assert revision == self.commit  # downloads are pinned to the commit just resolved
        self.snapshots.append((repo_id, tuple(allow_patterns or ()), local_dir))
        for path, data in self.repos[repo_id].items():
            if allow_patterns is None or any(fnmatch.fnmatch(path, p) for p in allow_patterns):
                target = Path(local_dir) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return local_dir


MAIN = {"acestep-v15-turbo/config.json": b"{}", "acestep-v15-turbo/model.safetensors": b"W" * 500,
        "vae/config.json": b"{}", "Qwen3-Embedding-0.6B/config.json": b"{}",
        "acestep-5Hz-lm-1.7B/model.safetensors": b"L" * 900}
BASE = {"config.json": b"{}", "model.safetensors": b"B" * 300, "silence_latent.pt": b"s"}


def test_known_models_map_to_their_published_repos():
    turbo = source_for("acestep-v15-turbo", env={})
    assert (turbo.repo, turbo.layout, turbo.revision) == (MAIN_REPO, "original", "main")
    assert source_for("acestep-v15-base", env={}).repo == "ACE-Step/acestep-v15-base"
    xl = source_for("acestep-v15-xl-turbo", env={})
    assert (xl.repo, xl.layout) == ("ACE-Step/acestep-v15-xl-turbo-diffusers", "diffusers")
    custom = source_for("acestep-v15-turbo", env={"ACESTEP_HF_REPO_ACESTEP_V15_TURBO": "me/turbo-diffusers",
                                                  "ACESTEP_HF_REVISION_ACESTEP_V15_TURBO": "v2"})
    assert (custom.repo, custom.layout, custom.revision) == ("me/turbo-diffusers", "diffusers", "v2")


def test_the_main_repo_model_comes_with_its_shared_folders_and_not_the_lm(tmp_path):
    hub = FakeHub({MAIN_REPO: MAIN})
    folder = download(source_for("acestep-v15-turbo", env={}), tmp_path, hub.snapshot, hub.files)
    assert folder == tmp_path / "acestep-v15-turbo" and (folder / "model.safetensors").read_bytes() == b"W" * 500
    assert (tmp_path / "vae" / "config.json").is_file() and (tmp_path / "Qwen3-Embedding-0.6B").is_dir()
    assert not (tmp_path / "acestep-5Hz-lm-1.7B").exists()  # the LM is not part of a DiT download
    record = json.loads((folder / "acestep-source.json").read_text())
    assert record["commits"] == {MAIN_REPO: hub.commit} and record["layout"] == "original"


def test_a_variant_repo_lands_in_its_folder_beside_the_shared_ones(tmp_path):
    hub = FakeHub({MAIN_REPO: MAIN, "ACE-Step/acestep-v15-base": BASE})
    folder = download(source_for("acestep-v15-base", env={}), tmp_path, hub.snapshot, hub.files)
    assert (folder / "model.safetensors").read_bytes() == b"B" * 300 and (tmp_path / "vae").is_dir()
    assert [s[0] for s in hub.snapshots] == [MAIN_REPO, "ACE-Step/acestep-v15-base"]
    assert not (tmp_path / "acestep-v15-turbo").exists()  # only the shared folders came from the main repo


def test_a_damaged_download_is_refused_naming_the_file(tmp_path):
    hub = FakeHub({MAIN_REPO: MAIN})
    original = hub.snapshot

    def corrupting(**kw):
        original(**kw)
        (Path(kw["local_dir"]) / "acestep-v15-turbo" / "model.safetensors").write_bytes(b"X" * 500)

    with pytest.raises(model_sources.DownloadFailed, match="model.safetensors: sha256 differs") as failed:
        download(source_for("acestep-v15-turbo", env={}), tmp_path, corrupting, hub.files)
    assert "\n" not in str(failed.value) and "acestep-models download acestep-v15-turbo" in str(failed.value)
    assert not (tmp_path / "acestep-v15-turbo" / "model.safetensors").exists()  # fetched again next time
    assert (tmp_path / "acestep-v15-turbo" / model_sources.DOWNLOADING).is_file()  # not a model yet


def test_later_downloads_keep_the_recorded_commit(tmp_path):
    hub = FakeHub({MAIN_REPO: MAIN})
    download(source_for("acestep-v15-turbo", env={}), tmp_path, hub.snapshot, hub.files)
    asked = []

    def files(repo, revision):
        asked.append(revision)
        return hub.files(repo, revision)

    download(source_for("acestep-v15-turbo", env={}), tmp_path, hub.snapshot, files)
    assert asked == [hub.commit]  # not "main": the model does not move under a running service


def unreadable_by_others(root: Path) -> list[str]:
    """Paths under root that a user other than the owner could not read (or, for folders, enter)."""
    bad = []
    for path in [root, *root.rglob("*")]:
        if path.name.endswith(".lock"):  # lock files are the writers' own
            continue
        need = 0o005 if path.is_dir() else 0o004
        if path.stat().st_mode & need != need:
            bad.append(f"{path.relative_to(root)} {oct(path.stat().st_mode & 0o777)}")
    return bad


@pytest.fixture
def owner_only_umask():
    """Write as root with umask 077 would: everything new is owner-only unless the code says otherwise."""
    import os

    previous = os.umask(0o077)
    yield
    os.umask(previous)


def test_a_missing_model_is_downloaded_in_the_original_layout_and_converted_for_loading(tmp_path, monkeypatch,
                                                                                         owner_only_umask):
    """resolve_model's whole path: the hub (stand-in serving a tiny original-layout repo) -> verified
    download -> one conversion -> a diffusers-layout folder the engine loads. Under umask 077 every folder
    and file it wrote (the model, the shared vae/ and text encoder, the converted copy) is readable by a
    worker of another uid (issue 25: converted as root, the image's uid-1000 worker could not read them)."""
    import huggingface_hub

    from engine.weights.checkpoints import build_tiny_checkpoint, is_complete, resolve_model
    from engine.config import EngineConfig

    published = tmp_path / "published"
    build_tiny_checkpoint(published / "acestep-v15-turbo", layout="original")
    repo = {p.relative_to(published).as_posix(): p.read_bytes() for p in published.rglob("*") if p.is_file()}
    hub = FakeHub({MAIN_REPO: repo})
    monkeypatch.setattr(model_sources, "hub_repo_files", hub.files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    config = EngineConfig(checkpoint_dir=str(tmp_path / "ckpt"), model_names=["acestep-v15-turbo"], allow_download=True)
    folder = resolve_model(config, "acestep-v15-turbo")
    assert is_complete(folder) and folder == tmp_path / "ckpt" / ".diffusers" / "acestep-v15-turbo"
    assert (tmp_path / "ckpt" / "acestep-v15-turbo" / "acestep-source.json").is_file()
    assert resolve_model(config, "acestep-v15-turbo") == folder and len(hub.snapshots) == 1  # not fetched again
    assert unreadable_by_others(tmp_path / "ckpt") == []
    assert unreadable_by_others(published) == []  # the original-layout export (mkdtemp folders) too


def test_lm_folders_download_without_the_dit_parts(tmp_path):
    main = {**MAIN, "acestep-5Hz-lm-1.7B/config.json": b"{}"}
    hub = FakeHub({MAIN_REPO: main, "ACE-Step/acestep-5Hz-lm-0.6B": {"config.json": b"{}", "model.safetensors": b"m"}})
    one_seven = download(source_for("acestep-5Hz-lm-1.7B", env={}), tmp_path, hub.snapshot, hub.files)
    assert (one_seven / "model.safetensors").read_bytes() == b"L" * 900
    assert not (tmp_path / "vae").exists() and not (tmp_path / "acestep-v15-turbo").exists()
    small = download(source_for("acestep-5Hz-lm-0.6B", env={}), tmp_path, hub.snapshot, hub.files)
    assert small == tmp_path / "acestep-5Hz-lm-0.6B" and (small / "model.safetensors").read_bytes() == b"m"


def test_a_required_lm_is_downloaded_at_start(tmp_path, monkeypatch):
    import huggingface_hub

    from entrypoints.bootstrap import choose_lm
    from service.config import Settings

    hub = FakeHub({MAIN_REPO: {**MAIN, "acestep-5Hz-lm-1.7B/config.json": b"{}"}})
    monkeypatch.setattr(model_sources, "hub_repo_files", hub.files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    settings = Settings(checkpoint_dir=str(tmp_path), init_llm="true", demo_if_missing=False)
    assert choose_lm(settings, demo_dits=[]) == "acestep-5Hz-lm-1.7B"
    assert (tmp_path / "acestep-5Hz-lm-1.7B" / "model.safetensors").is_file()
    off = Settings(checkpoint_dir=str(tmp_path / "none"), init_llm="auto", demo_if_missing=False)
    assert choose_lm(off, demo_dits=[]) is None  # auto with real DiTs and no LM folder: the DiT runs alone

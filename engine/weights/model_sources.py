"""Where each known model comes from on the Hugging Face hub, and how to fetch it whole.

The official 2B DiTs are published in ACE-Step's original layout: the main repo holds the turbo DiT
with the VAE and text encoder every DiT needs; each other variant is a repo of its own holding just
its DiT folder. The XL DiTs are published twice: as official diffusers-format repos
(ACE-Step/acestep-v15-xl-*-diffusers, bf16, loaded as they are: the default here), and as upstream's own
original-layout repos (ACE-Step/acestep-v15-xl-*, what upstream's downloader fetches: float32 DiT shards
with their own vae/ and Qwen3-Embedding-0.6B/; ACESTEP_HF_REPO_<NAME> picks one, converted once like the
2B DiTs). A download lands in the layout the engine loads (engine/weights/checkpoints.py converts an
original-layout DiT once):

    <checkpoint_dir>/vae/, <checkpoint_dir>/Qwen3-Embedding-0.6B/    from the main repo
    <checkpoint_dir>/<name>/                                          the DiT (either layout)

Every source can be overridden per model: ACESTEP_HF_REPO_<NAME> (a whole repo: diffusers layout, or an
original-layout DiT bundled with its vae/ and text encoder)
and ACESTEP_HF_REVISION_<NAME> (a branch, tag or commit). The first download records the commit it
got in <checkpoint_dir>/<name>/acestep-source.json; verification and later downloads use that
commit, so a model does not change under a running service. While a download runs, the model's folder
holds DOWNLOADING: a folder with it is not a model yet (an interrupted download resumes next time).
A failed download raises DownloadFailed, whose message is one line: the model, the cause, the fix.
HF_ENDPOINT is read at each call (a mirror, or a test's local hub).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Optional

from engine.weights.atomic_dir import share_readable

log = logging.getLogger(__name__)

MAIN_REPO = "ACE-Step/Ace-Step1.5"
SHARED_FOLDERS = ("vae", "Qwen3-Embedding-0.6B")  # beside every original-layout DiT
SOURCE_RECORD = "acestep-source.json"
DOWNLOADING = ".acestep-downloading"  # in the model's folder from the first byte until verified

Layout = Literal["original", "diffusers", "lm"]  # lm: a 5 Hz LM folder (transformers format), as published


@dataclass(frozen=True)
class Fetch:
    """One snapshot download: `repo` at `revision`, files matching `patterns`, into `into`."""
    repo: str
    revision: str
    patterns: Optional[tuple[str, ...]]  # None: the whole repo
    into: Path


@dataclass(frozen=True)
class ModelSource:
    name: str
    repo: str
    layout: Layout
    revision: str = "main"

    @property
    def in_main_repo(self) -> bool:
        return self.repo == MAIN_REPO

    def fetches(self, checkpoint_dir: Path) -> list[Fetch]:
        if self.layout == "diffusers":
            return [Fetch(self.repo, self.revision, None, checkpoint_dir / self.name)]
        if self.layout == "lm":  # a folder of the main repo, or a repo of its own; no VAE or text encoder
            if self.in_main_repo:
                return [Fetch(MAIN_REPO, self.revision, (f"{self.name}/*",), checkpoint_dir)]
            return [Fetch(self.repo, self.revision, None, checkpoint_dir / self.name)]
        shared = tuple(f"{folder}/*" for folder in SHARED_FOLDERS)
        if self.in_main_repo:  # the DiT is a folder of the main repo: one download brings all
            return [Fetch(MAIN_REPO, self.revision, (f"{self.name}/*", *shared), checkpoint_dir)]
        return [Fetch(MAIN_REPO, "main", shared, checkpoint_dir),
                Fetch(self.repo, self.revision, None, checkpoint_dir / self.name)]

    def describe(self) -> str:
        where = f"{self.repo}/{self.name}" if self.in_main_repo else self.repo
        return f"{where} @ {self.revision} ({self.layout} layout)"


# name -> (repo, layout); the 2B variants as upstream's own downloader names them
KNOWN: dict[str, tuple[str, Layout]] = {
    "acestep-v15-turbo": (MAIN_REPO, "original"),
    "acestep-v15-turbo-shift1": ("ACE-Step/acestep-v15-turbo-shift1", "original"),
    "acestep-v15-turbo-shift3": ("ACE-Step/acestep-v15-turbo-shift3", "original"),
    "acestep-v15-turbo-continuous": ("ACE-Step/acestep-v15-turbo-continuous", "original"),
    "acestep-v15-base": ("ACE-Step/acestep-v15-base", "original"),
    "acestep-v15-sft": ("ACE-Step/acestep-v15-sft", "original"),
    "acestep-v15-xl-turbo": ("ACE-Step/acestep-v15-xl-turbo-diffusers", "diffusers"),
    "acestep-v15-xl-base": ("ACE-Step/acestep-v15-xl-base-diffusers", "diffusers"),
    "acestep-v15-xl-sft": ("ACE-Step/acestep-v15-xl-sft-diffusers", "diffusers"),
    "acestep-5Hz-lm-0.6B": ("ACE-Step/acestep-5Hz-lm-0.6B", "lm"),
    "acestep-5Hz-lm-1.7B": (MAIN_REPO, "lm"),
    "acestep-5Hz-lm-4B": ("ACE-Step/acestep-5Hz-lm-4B", "lm"),
}


def _env_key(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def source_for(name: str, env: Mapping[str, str] | None = None) -> ModelSource:
    """The configured source of `name`: an override, else the known table, else `ACE-Step/<name>-diffusers`."""
    env = os.environ if env is None else env
    revision = env.get(_env_key("ACESTEP_HF_REVISION_", name)) or "main"
    override = env.get(_env_key("ACESTEP_HF_REPO_", name))
    if override:
        return ModelSource(name, override, "diffusers", revision)
    repo, layout = KNOWN.get(name, (f"ACE-Step/{name}-diffusers", "diffusers"))
    return ModelSource(name, repo, layout, revision)


def override_hint(name: str) -> str:
    return f"{_env_key('ACESTEP_HF_REPO_', name)} / {_env_key('ACESTEP_HF_REVISION_', name)}"


# -- downloading --------------------------------------------------------------------------------

class DownloadFailed(Exception):
    """A download that did not complete; str() is one line naming the model, the cause and the fix."""

    def __init__(self, name: str, where: str, cause: str, fix: str):
        self.name, self.where, self.cause, self.fix = name, where, cause, fix
        super().__init__(f"cannot download {name} from {where}: {cause}. {fix[:1].upper()}{fix[1:]}")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def _endpoint_kwargs() -> dict:
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return {"endpoint": endpoint} if endpoint else {}


def _one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def explain_failure(exc: BaseException, source: "ModelSource", repo: str) -> tuple[str, str]:
    """(cause, fix) of a failed hub call, each a short sentence."""
    from huggingface_hub import errors as hf

    retry = f"run `acestep-models download {source.name}` again (it resumes)"
    chain: list[BaseException] = []
    seen: Optional[BaseException] = exc
    while seen is not None and seen not in chain:  # the hub's errors wrap the one that says what happened
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, hf.GatedRepoError):
            return (f"{repo} is gated (its licence must be accepted first)",
                    f"accept it on {hub_endpoint()}/{repo} and set HF_TOKEN, then {retry}")
        if isinstance(err, hf.RevisionNotFoundError):
            return (f"{repo} has no revision {source.revision!r}",
                    f"set {_env_key('ACESTEP_HF_REVISION_', source.name)} to a branch, tag or commit it has")
        if isinstance(err, hf.RepositoryNotFoundError):
            return (f"{repo} does not exist on {hub_endpoint()} (or is private)",
                    f"set {override_hint(source.name)} to a repo that holds it, or HF_TOKEN for a private one")
        if isinstance(err, hf.HfHubHTTPError) and getattr(err, "response", None) is not None:
            status = err.response.status_code
            if status in (401, 403):
                return f"{hub_endpoint()} refused access (HTTP {status})", f"set HF_TOKEN to a token that can read {repo}"
            if status == 429:
                return f"{hub_endpoint()} is rate-limiting this machine (HTTP 429)", f"wait a few minutes, then {retry}"
            if status >= 500:
                return f"{hub_endpoint()} is unavailable (HTTP {status})", f"try again later: {retry}"
            return f"{hub_endpoint()} answered HTTP {status} ({_one_line(err, 120)})", retry
        if type(err).__module__.split(".")[0].startswith("httpx") or isinstance(err, (ConnectionError, TimeoutError)):
            return (f"could not reach {hub_endpoint()} ({type(err).__name__}: {_one_line(err, 120)})",
                    f"check the network (a proxy: HTTPS_PROXY; a mirror: HF_ENDPOINT), then {retry}")
        if isinstance(err, OSError) and err.errno == 28:
            return f"no space left on the disk holding {getattr(err, 'filename', None) or 'the checkpoint dir'}", \
                f"free some space (or point ACESTEP_CHECKPOINT_DIR at a larger disk), then {retry}"
    return f"{type(exc).__name__}: {_one_line(exc)}", retry

Snapshot = Callable[..., str]  # huggingface_hub.snapshot_download
RepoFiles = Callable[[str, str], tuple[str, dict[str, tuple[int, Optional[str]]]]]  # (commit, {path: (size, sha256)})


def hub_repo_files(repo: str, revision: str) -> tuple[str, dict[str, tuple[int, Optional[str]]]]:
    """The commit a revision names now, and each file's size and (for large files) sha256."""
    from huggingface_hub import HfApi

    info = HfApi(**_endpoint_kwargs()).model_info(repo, revision=revision, files_metadata=True)
    files = {s.rfilename: (int(s.size or 0), s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}
    return str(info.sha), files


def download(source: ModelSource, checkpoint_dir: Path, snapshot: Optional[Snapshot] = None,
             repo_files: Optional[RepoFiles] = None) -> Path:
    """Fetch `source` into `checkpoint_dir` (resuming partial files), verify every file, record the commit.

    Returns the model's folder, `<checkpoint_dir>/<name>`. Raises DownloadFailed.
    """
    if snapshot is None:
        from huggingface_hub import snapshot_download as snapshot
    repo_files = repo_files or hub_repo_files
    model_dir = checkpoint_dir / source.name
    recorded = _recorded_commits(model_dir)
    commits = {}
    for fetch in source.fetches(checkpoint_dir):
        pinned = recorded.get(fetch.repo) or fetch.revision
        try:
            commit, files = repo_files(fetch.repo, pinned)
            log.warning("downloading %s (%s @ %s) into %s", source.name, fetch.repo, commit[:12], fetch.into)
            model_dir.mkdir(parents=True, exist_ok=True)
            (model_dir / DOWNLOADING).write_text(f"{fetch.repo} @ {commit}\n")
            fetch.into.mkdir(parents=True, exist_ok=True)
            snapshot(repo_id=fetch.repo, revision=commit, allow_patterns=list(fetch.patterns) if fetch.patterns
                     else None, local_dir=str(fetch.into), **_endpoint_kwargs())  # shows progress, resumes
        except Exception as exc:
            cause, fix = explain_failure(exc, source, fetch.repo)
            raise DownloadFailed(source.name, f"{fetch.repo} @ {pinned}", cause, fix) from exc
        problems = verify(fetch, files)
        if problems:
            raise DownloadFailed(source.name, f"{fetch.repo} @ {commit[:12]}",
                                 f"the files in {fetch.into} do not match the hub's ({problems})",
                                 f"they were removed: run `acestep-models download {source.name}` again to fetch them")
        commits[fetch.repo] = commit
    record = {"name": source.name, "repo": source.repo, "layout": source.layout, "commits": commits}
    (model_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for fetch in source.fetches(checkpoint_dir):  # the model and the folders it shares (vae/, text encoder)
        share_readable(fetch.into)  # readable by a worker of another uid than the one that downloaded
    (model_dir / DOWNLOADING).unlink(missing_ok=True)
    return model_dir


def is_downloading(model_dir: Path) -> bool:
    """A download into this folder started and was not verified yet: it is not a model (yet)."""
    return (model_dir / DOWNLOADING).is_file()


def recorded_source(model_dir: Path) -> Optional[dict]:
    """What `download` recorded for this folder (repo, layout, commits), or None."""
    try:
        return dict(json.loads((model_dir / SOURCE_RECORD).read_text()))
    except (OSError, ValueError):
        return None


def verify(fetch: Fetch, files: dict[str, tuple[int, Optional[str]]]) -> str:
    """Every file the download should have brought is there, with the hub's size (and sha256 for large files).

    Returns what is wrong ("" when nothing is); a wrong file is deleted so the next download fetches it again."""
    import fnmatch

    wanted = {path: meta for path, meta in files.items()
              if fetch.patterns is None or any(fnmatch.fnmatch(path, p) for p in fetch.patterns)}
    problems = []
    for path, (size, sha256) in sorted(wanted.items()):
        local = fetch.into / path
        if not local.is_file():
            problems.append(f"{path}: missing")
        elif local.stat().st_size != size:
            problems.append(f"{path}: {local.stat().st_size} bytes, the hub has {size}")
            local.unlink()  # the next download fetches it again rather than trusting it
        elif sha256 and _sha256(local) != sha256:
            problems.append(f"{path}: sha256 differs from the hub's")
            local.unlink()
    return "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_commits(model_dir: Path) -> dict[str, str]:
    try:
        return dict(json.loads((model_dir / SOURCE_RECORD).read_text()).get("commits") or {})
    except (OSError, ValueError):
        return {}

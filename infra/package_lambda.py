"""Build the Lambda zip-asset directory without Docker: base dependencies + our packages, no torch.

    python infra/package_lambda.py build/lambda [--zip build/lambda.zip]
    cd infra && cdk deploy -c lambda_asset_dir=../build/lambda

Wheels are fetched for Lambda's platform (manylinux x86_64, CPython LAMBDA_PYTHON) at the versions the lock
(constraints.txt) pins, so this works from any machine with pip and network access to PyPI. The stack deploys
the zip on that runtime with SnapStart.

Reproducible and cached, so a synth of an unchanged commit publishes nothing new:
- the same bytes every time: no bytecode (pip --no-compile; a Python 3.11 build machine would otherwise leave
  cpython-311 .pyc files that 3.13 ignores), no console scripts (their shebang names the build machine's Python),
  every file's mtime fixed; --zip writes sorted entries with fixed timestamps and modes. CDK fingerprints the
  directory by its files' paths and contents, so the asset hash is stable;
- pip runs only when its inputs change: the installed dependencies are kept in build/lambda-cache under a key of
  the lock, the platform, the requirements and the pip options; our sources are copied in afresh (and the whole
  directory is left as it is when neither changed). The last three dependency sets are kept.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# The Lambda runtime of the zip. 3.12 and later have SnapStart; 3.13 is the one the package was run under.
LAMBDA_PYTHON = "3.13"
LAMBDA_PLATFORM = "manylinux2014_x86_64"
PACKAGES = ("entrypoints", "handlers", "service", "engine")  # engine: only the torch-free request model is imported
LOCK = ROOT / "constraints.txt"
CACHE = ROOT / "build" / "lambda-cache"
FIXED_MTIME = 315532800  # 1980-01-01T00:00:00Z, the earliest time a zip entry can hold
KEY_FILE = ".package-key"  # in the cache folders only, never in the asset
FORMAT = 2  # bump when the way the package is built changes


def base_dependencies(root: Path = ROOT) -> list[str]:
    import tomllib

    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]


def source_files(root: Path, packages: Sequence[str] = PACKAGES) -> list[Path]:
    """Our packages' files (relative to root), sorted; bytecode caches left out."""
    files = [p.relative_to(root) for package in packages for p in (root / package).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return sorted(files, key=lambda p: p.as_posix())


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def dependencies_key(lock_text: str, requirements: Sequence[str], pip_options: Sequence[str]) -> str:
    """What pip's result depends on: the pins, the platform, what is asked for and how."""
    return digest([str(FORMAT).encode(), LAMBDA_PYTHON.encode(), LAMBDA_PLATFORM.encode(), lock_text.encode(),
                   json.dumps(list(requirements)).encode(), json.dumps(list(pip_options)).encode()])


def sources_key(root: Path, packages: Sequence[str] = PACKAGES) -> str:
    return digest(part for f in source_files(root, packages) for part in (f.as_posix().encode(), (root / f).read_bytes()))


def tree_hash(folder: Path) -> str:
    """The directory's identity as CDK sees an asset: every file's relative path and contents."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    return digest(part for f in files for part in (f.relative_to(folder).as_posix().encode(), f.read_bytes()))


def lambda_constraints(lock_text: str) -> str:
    """The lock's pins without uv's comments (pip reads either; this keeps the temporary file small)."""
    return "".join(line + "\n" for line in lock_text.splitlines() if line and not line.startswith((" ", "#")))


def install_dependencies(target: Path, requirements: Sequence[str], lock: Path, pip: Sequence[str],
                         pip_options: Sequence[str]) -> None:
    constraints = target.parent / f"{target.name}.constraints.txt"
    constraints.write_text(lambda_constraints(lock.read_text()))
    try:
        subprocess.run([*pip, "install", "--quiet", "--no-compile", "--target", str(target),
                        "--platform", LAMBDA_PLATFORM, "--implementation", "cp", "--python-version", LAMBDA_PYTHON,
                        "--only-binary=:all:", "--constraint", str(constraints), *pip_options, *requirements],
                       check=True)
    finally:
        constraints.unlink(missing_ok=True)
    # Console scripts carry this machine's interpreter path in their shebang; the Lambda runs none of them.
    shutil.rmtree(target / "bin", ignore_errors=True)


def installed_versions(folder: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    found = {}
    for meta in folder.glob("*.dist-info/METADATA"):
        fields = dict(line.split(": ", 1) for line in meta.read_text(errors="replace").splitlines()[:20]
                      if ": " in line)
        found[canonicalize_name(fields["Name"])] = fields["Version"]
    return found


def check_pinned(folder: Path, lock_text: str) -> None:
    """Every distribution in the package is at the version the lock pins: nothing resolved on the side."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, set[str]] = {}
    for line in lambda_constraints(lock_text).splitlines():
        req = Requirement(line)
        pins.setdefault(canonicalize_name(req.name), set()).update(s.version for s in req.specifier)
    off = {name: version for name, version in installed_versions(folder).items() if version not in pins.get(name, ())}
    if off:
        raise SystemExit(f"not pinned by {LOCK.name} (run `make lock`): "
                         + ", ".join(f"{n}=={v}" for n, v in sorted(off.items())))


def foreign_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix == ".pyc" or p.name == "__pycache__")


def normalize(folder: Path) -> None:
    """Fixed mtimes and plain modes, so tools that do look at them (zip, rsync) see the same tree every time."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            executable = path.stat().st_mode & stat.S_IXUSR
            path.chmod(0o755 if executable else 0o644)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(folder, (FIXED_MTIME, FIXED_MTIME))


def write_zip(folder: Path, archive: Path) -> None:
    """The folder as a zip with sorted entries, fixed timestamps and modes: the same bytes for the same tree."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = ((0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644) | stat.S_IFREG) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever the build machine
            zf.writestr(info, path.read_bytes())


def _prune(cache: Path, keep: Path, kept: int = 3) -> None:
    """Dependency sets of older locks go, but the last few stay (switching branches back needs no pip)."""
    others = sorted((d for d in cache.glob("deps-*") if d != keep), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in others[kept - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _read_stamp(stamp: Path) -> dict:
    try:
        return dict(json.loads(stamp.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _read_key(folder: Path) -> str:
    try:
        return (folder / KEY_FILE).read_text()
    except OSError:
        return ""


def build(out: Path, *, root: Path = ROOT, lock: Path = LOCK, requirements: Optional[Sequence[str]] = None,
          packages: Sequence[str] = PACKAGES, cache: Path = CACHE,
          pip: Sequence[str] = (sys.executable, "-m", "pip"), pip_options: Sequence[str] = ()) -> dict:
    """Make `out` the Lambda asset directory; returns what was done (pip ran or not) and the tree's hash."""
    started = time.monotonic()
    lock_text = lock.read_text()
    requirements = list(requirements if requirements is not None else base_dependencies(root))
    deps_key = dependencies_key(lock_text, requirements, pip_options)
    whole_key = digest([deps_key.encode(), sources_key(root, packages).encode()])
    # {"key", "tree"} of the last build into `out`, kept in the cache (not in or beside the asset)
    stamp = cache / "outputs" / f"{digest([str(out.resolve()).encode()])[:32]}.json"
    built = _read_stamp(stamp)
    if out.is_dir() and built.get("key") == whole_key:
        tree = tree_hash(out)
        if tree == built.get("tree"):  # and nobody has edited the folder since
            return {"pip": False, "rebuilt": False, "hash": tree, "seconds": time.monotonic() - started}

    deps = cache / f"deps-{deps_key[:32]}"
    ran_pip = _read_key(deps) != deps_key
    if ran_pip:
        shutil.rmtree(deps, ignore_errors=True)
        deps.mkdir(parents=True)
        install_dependencies(deps, requirements, lock, pip, pip_options)
        if (deps / "torch").exists():
            raise SystemExit("torch ended up in the Lambda package")
        check_pinned(deps, lock_text)
        (deps / KEY_FILE).write_text(deps_key)
        _prune(cache, keep=deps)

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(deps, out, ignore=shutil.ignore_patterns(KEY_FILE))
    for relative in source_files(root, packages):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, out / relative)
    foreign = foreign_files(out)
    if foreign:
        raise SystemExit(f"bytecode in the Lambda package (would not match Python {LAMBDA_PYTHON}): {foreign[:5]}")
    normalize(out)
    tree = tree_hash(out)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": whole_key, "tree": tree}))
    return {"pip": ran_pip, "rebuilt": True, "hash": tree, "seconds": time.monotonic() - started}


def main(out: str, archive: Optional[str] = None) -> None:
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    result = build(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 1e6
    what = ("unchanged" if not result["rebuilt"] else
            "dependencies from the cache" if not result["pip"] else "dependencies installed by pip")
    print(f"Lambda package in {target}: {size:.0f} MB unzipped (limit 250 MB), {what}, "
          f"{result['seconds']:.1f} s, sha256 {result['hash'][:16]}")
    if archive:
        write_zip(target, Path(archive).resolve())
        print(f"zip: {archive} ({Path(archive).stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the API's Lambda package (reproducible, cached).")
    parser.add_argument("out", nargs="?", default=str(ROOT / "build" / "lambda"))
    parser.add_argument("--zip", help="also write the folder as a deterministic zip here")
    args = parser.parse_args()
    main(args.out, args.zip)

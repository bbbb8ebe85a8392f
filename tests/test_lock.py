"""constraints.txt, the lock: every dependency pyproject.toml and client/pyproject.toml declare (base and the
engine, dev and infra extras; `gpu` is vLLM's own pin set, outside it) is pinned there with ==, the pin satisfies
the declared range, and every install path (make, the Docker images, the Lambda package) goes through it."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("engine", "dev", "infra")
OWN = {"acestep-serve", "acestep-client"}


def lock_pins(text: str) -> dict[str, list[tuple[Version, str]]]:
    """name -> [(pinned version, marker)] (a universal lock may pin a package per platform)."""
    pins: dict[str, list[tuple[Version, str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "#", "-")):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line!r}"
        pins.setdefault(canonicalize_name(req.name), []).append((Version(spec[0].version), str(req.marker or "")))
    return pins


def declared() -> list[tuple[str, Requirement]]:
    found = []
    for path in (ROOT / "pyproject.toml", ROOT / "client" / "pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        groups = {"base": project.get("dependencies", [])}
        groups.update({extra: project.get("optional-dependencies", {}).get(extra, []) for extra in LOCKED_EXTRAS})
        for group, requirements in groups.items():
            found += [(f"{path.relative_to(ROOT)} [{group}]", Requirement(r)) for r in requirements]
    return found


def unpinned(pins: dict[str, list[tuple[Version, str]]]) -> list[str]:
    problems = []
    for where, req in declared():
        name = canonicalize_name(req.name)
        if name in OWN:
            continue
        if name not in pins:
            problems.append(f"{where}: {req} is not in constraints.txt (run `make lock`)")
            continue
        for version, _ in pins[name]:
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{where}: {req} but constraints.txt pins {name}=={version} (run `make lock`)")
    return problems


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = lock_pins((ROOT / "constraints.txt").read_text())
    assert len(pins) > 100  # the whole closure, not only the direct dependencies
    assert unpinned(pins) == []


def test_a_missing_or_out_of_range_pin_is_caught():
    text = (ROOT / "constraints.txt").read_text()
    without_fastapi = "\n".join(line for line in text.splitlines() if not line.startswith("fastapi=="))
    assert any("fastapi" in p and "not in constraints.txt" in p for p in unpinned(lock_pins(without_fastapi)))
    old_pydantic = re.sub(r"^pydantic==\S+", "pydantic==2.5.0", text, flags=re.M)
    assert any("pydantic>=2.11" in p and "2.5.0" in p for p in unpinned(lock_pins(old_pydantic)))


def test_the_lock_pins_the_tested_torch_and_the_lambdas_dependencies_once():
    pins = lock_pins((ROOT / "constraints.txt").read_text())
    assert [str(v) for v, _ in pins["torch"]] == ["2.13.0"]
    # The Lambda package is installed for Python 3.13 by a pip that evaluates markers on 3.11: the base
    # dependencies must have one pin each, whatever the Python version.
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in (canonicalize_name(Requirement(r).name) for r in base):
        assert len(pins[name]) == 1 and "python" not in pins[name][0][1], name


def test_every_install_goes_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK := constraints\.txt$", makefile, re.M)
    main_venv_installs = re.findall(r"^\t\$\(BIN\)/pip install [^\n]*-e[^\n]*$", makefile, re.M)
    assert main_venv_installs and all("-c $(LOCK)" in line for line in main_venv_installs)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"--constraint \S*constraints\.txt", dockerfile)) == 3  # worker, api, lambda
    assert "constraints.txt" in (ROOT / "infra" / "package_lambda.py").read_text()


def test_the_environment_under_test_is_the_locked_one():
    """What `make test` installed is what the lock pins: every distribution here, at its pinned version (a
    package missing from the lock means the lock is not the whole closure: run `make lock`)."""
    import importlib.metadata

    pins = lock_pins((ROOT / "constraints.txt").read_text())
    off = []
    for dist in importlib.metadata.distributions():
        name, version = canonicalize_name(dist.metadata["Name"]), Version(dist.version)
        if name in OWN or name in {"pip", "uv"}:
            continue
        pinned = {v for v, _ in pins.get(name, [])}
        if Version(version.public) not in pinned:  # a local label (torch's +cpu) is the build, not the version
            off.append(f"{name}=={version} (lock: {', '.join(map(str, sorted(pinned))) or 'not pinned'})")
    assert off == []

"""acestep-client (client/) is a package of its own: built as `pip install ./client` builds it, it declares
httpx and tqdm and nothing else, and installed into a fresh venv that holds only those two and what
they need, the library and the `acestep` command work (no server package, no torch, no FastAPI).

Offline and quick: the wheel is built without build isolation from this environment's setuptools,
installed with --no-deps, and its dependencies are the installed httpx/tqdm distributions of this
environment (and theirs), linked one by one into the fresh venv."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.live_server import REPO, free_port

CLIENT = Path(REPO) / "client"
DECLARED = {"httpx", "tqdm"}
SERVER_SIDE = {"acestep-serve", "fastapi", "starlette", "uvicorn", "pydantic", "boto3", "torch", "numpy",
               "aws-lambda-powertools", "mangum", "diffusers", "transformers"}


def closure(names: set[str]) -> set[str]:
    """The distributions `names` need, themselves included (this environment's installed versions;
    markers evaluated here, extras not asked for left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("client-build")
    source = work / "client"  # a copy: the build leaves build/ and *.egg-info/ behind
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(work / "dist"), str(source)], check=True, capture_output=True)
    [built] = (work / "dist").glob("acestep_client-*.whl")
    return built


def test_the_wheel_declares_httpx_and_tqdm_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = Parser().parsestr(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert meta["Name"] == "acestep-client"
    assert {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist") or []} == DECLARED
    assert "acestep = acestep_client.cli:main" in entry_points
    assert {n.split("/", 1)[0] for n in names if not n.startswith("acestep_client-")} == {"acestep_client"}
    needed = closure(DECLARED)
    assert not needed & SERVER_SIDE, needed
    assert len(needed) <= 10, f"httpx + tqdm should pull a handful of packages, not {sorted(needed)}"


def test_a_fresh_venv_with_only_httpx_and_tqdm_runs_the_client_and_the_cli(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    # The dependencies: each installed distribution of the closure, linked file by top-level name.
    deps = tmp_path / "deps"
    deps.mkdir()
    for name in closure(DECLARED):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "bin"}:
            target = Path(str(dist.locate_file(top)))
            if target.exists() and not (deps / top).exists():
                (deps / top).symlink_to(target)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(str(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
           and not k.startswith("ACESTEP_")}

    probe = ("import json, sys, acestep_client, acestep_client.cli, acestep_client.progress, tqdm; "
             "from importlib import metadata; "
             "print(json.dumps({'loaded': sorted({m.split('.')[0] for m in sys.modules}), "
             "'dists': sorted(d.metadata['Name'] for d in metadata.distributions()), "
             "'client': acestep_client.__file__}))")
    run = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["client"].startswith(str(site)), seen["client"]  # the wheel's copy, not the repository's
    assert not {"torch", "fastapi", "starlette", "pydantic", "service", "handlers", "engine"} & set(seen["loaded"])
    assert {canonicalize_name(d) for d in seen["dists"]} == closure(DECLARED) | {"acestep-client"}

    nowhere = f"http://127.0.0.1:{free_port()}"
    cli = subprocess.run([str(venv / "bin" / "acestep"), "--api-url", nowhere, "models"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 5 and "cannot reach" in cli.stderr, (cli.returncode, cli.stderr)  # httpx ran


def test_make_run_installs_the_acestep_command_with_its_dependencies():
    """`make run`'s install: the package that owns the `acestep` script (client/), with its dependencies;
    the server package no longer declares the script (one owner per console script)."""
    import re
    import tomllib

    makefile = (Path(REPO) / "Makefile").read_text()
    recipe = re.search(r"^\$\(RUN_STAMP\):.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no $(RUN_STAMP) rule in the Makefile"
    installs = [line.split("#")[0].split() for line in recipe.group(1).splitlines() if "pip install" in line]
    client_lines = [words for words in installs if "./client" in words]
    assert client_lines, f"make run does not install ./client: {installs}"
    assert all("--no-deps" not in words for words in client_lines), client_lines
    scripts = {path: tomllib.loads((Path(REPO) / path).read_text())["project"].get("scripts", {})
               for path in ("pyproject.toml", "client/pyproject.toml")}
    assert "acestep" in scripts["client/pyproject.toml"] and "acestep" not in scripts["pyproject.toml"], scripts

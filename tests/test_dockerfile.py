"""The Dockerfile read the way Docker reads it: every stage's COPY/ADD sources are in the build context
that .dockerignore leaves (applied with docker-py's implementation of Docker's matcher), nothing secret or
heavy is, the images install torch and the dependencies from the lock, and both long-running images have a
HEALTHCHECK. Where a Docker engine answers, the images are built for real."""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths
from packaging.requirements import Requirement

from tests.docker_support import copies, parse_dockerfile, stage_instructions, stages

ROOT = Path(__file__).resolve().parents[1]

# Paths that must never reach the build context: secrets, local data, weights, virtualenvs, build output.
FORBIDDEN = (".env", "service/.env", ".venv/bin/python", ".venv-vllm/bin/python", "data/tasks.db",
             "checkpoints/acestep-v15-turbo/model.safetensors", "engine/weights.safetensors",
             "infra/cdk.out/manifest.json", "infra/node_modules/aws-cdk/package.json",
             "node_modules/x/index.js", "build/lambda/fastapi/__init__.py", ".git/HEAD",
             "engine/__pycache__/request.cpython-311.pyc", ".mypy_cache/3.11/x.json")


def dockerignore_patterns(root: Path) -> list[str]:
    """.dockerignore as Docker reads it: one pattern a line, '#' lines are comments."""
    path = root / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def build_context(root: Path) -> set[str]:
    """Every file and folder (relative, '/'-separated) Docker would send as the build context of `root`."""
    return {p.replace(os.sep, "/") for p in exclude_paths(str(root), dockerignore_patterns(root))}


def missing_sources(root: Path) -> list[str]:
    """The COPY/ADD sources of every stage that are not in the build context Docker would send."""
    context = build_context(root)
    files = {p for p in context if (root / p).is_file()}
    problems = []
    for copy in copies(parse_dockerfile(root / "Dockerfile")):
        if not copy.from_context:
            continue
        for source in copy.sources:
            if re.match(r"^https?://", source):
                continue
            path = source.lstrip("./") or "."
            if any(c in path for c in "*?["):
                present = any(fnmatch.fnmatchcase(p, path) for p in context)
            elif (root / path).is_dir():
                present = path in context and any(f.startswith(path + "/") for f in files)
            else:
                present = path in files
            if not present:
                problems.append(f"{copy.stage}: {copy.instruction} {source}")
    return problems


def test_every_copy_source_of_every_stage_is_in_the_build_context():
    assert copies(parse_dockerfile(ROOT / "Dockerfile"))  # the parser found the COPYs it checks
    assert missing_sources(ROOT) == []


def test_a_source_left_out_by_dockerignore_is_caught(tmp_path):
    """The check above can fail: the .dockerignore that left entrypoints/ out while the Dockerfile copies it."""
    for name in ("Dockerfile", "pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("engine", "service", "handlers", "entrypoints"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / ".dockerignore").write_text("*\n!pyproject.toml\n!README.md\n!constraints.txt\n"
                                            "!engine/\n!service/\n!handlers/\n")
    assert missing_sources(tmp_path) == ["source: COPY entrypoints"]


def test_nothing_secret_or_heavy_is_in_the_build_context(tmp_path):
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    for relative in FORBIDDEN + ("engine/request.py", "service/worker.py", "pyproject.toml"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    context = build_context(tmp_path)
    assert {"engine/request.py", "service/worker.py", "pyproject.toml"} <= context
    assert sorted(set(FORBIDDEN) & context) == []
    # and in this checkout, whatever it holds now (virtualenvs, node_modules, data, weights...)
    real = build_context(ROOT)
    heavy = [p for p in real if p.split("/")[0] in {".venv", ".venv-vllm", "data", "checkpoints", "build", ".git"}
             or "node_modules" in p or "cdk.out" in p or p.endswith((".env", ".safetensors", ".pyc"))]
    assert heavy == []


def _lock_pin(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            req = Requirement(line)
            if req.name == name:
                return str(req.specifier).removeprefix("==")
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_worker_runs_the_tested_torch_on_the_matching_cuda_base():
    parser = parse_dockerfile(ROOT / "Dockerfile")
    args = {}
    for item in parser.structure:
        if item["instruction"] == "ARG" and "=" in item["value"]:
            key, value = item["value"].split("=", 1)
            args.setdefault(key, value)
    assert args["TORCH_VERSION"] == _lock_pin("torch") == "2.13.0"
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-", args["CUDA_IMAGE"])
    index = re.search(r"/whl/cu(\d+)$", args["TORCH_INDEX"])
    assert cuda and index, (args["CUDA_IMAGE"], args["TORCH_INDEX"])
    assert index.group(1) == cuda.group(1) + cuda.group(2)  # cu130 <-> CUDA 13.0
    assert stages(parser)["worker"] == "${CUDA_IMAGE}"
    worker = " ".join(i["value"] for i in stage_instructions(parser, "worker") if i["instruction"] == "RUN")
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in worker
    assert '--constraint constraints.txt ".[engine]"' in worker


def test_api_and_lambda_images_install_base_dependencies_with_the_lock():
    parser = parse_dockerfile(ROOT / "Dockerfile")
    for stage in ("api", "lambda"):
        runs = [i["value"] for i in stage_instructions(parser, stage) if i["instruction"] == "RUN"]
        installs = [line for run in runs for line in re.findall(r"pip install[^&]*", run)]
        assert installs and all("--constraint" in line for line in installs), stage
        assert not any("[" in line for line in installs), stage  # no extras: no engine, no torch
    lambda_cmd = [i["value"] for i in stage_instructions(parser, "lambda") if i["instruction"] == "CMD"]
    assert lambda_cmd == ['["entrypoints.lambda_api.handler"]']


def test_worker_and_api_have_healthchecks_on_the_stacks_heartbeat_file():
    parser = parse_dockerfile(ROOT / "Dockerfile")
    stack = ast.parse((ROOT / "infra" / "sections" / "workers.py").read_text())
    heartbeat = next(node.value.value for node in stack.body if isinstance(node, ast.Assign)
                     and any(getattr(t, "id", "") == "HEARTBEAT_FILE" for t in node.targets))
    worker = {i["instruction"]: i["value"] for i in stage_instructions(parser, "worker")}
    check = json.loads(worker["HEALTHCHECK"].split("CMD", 1)[1])
    assert check == ["acestep-worker", "--healthcheck", "--heartbeat-file", heartbeat]
    assert worker["ENTRYPOINT"] == '["acestep-worker"]'
    assert json.loads(worker["CMD"])[-2:] == ["--heartbeat-file", heartbeat]  # the process writes what the check reads
    api = {i["instruction"]: i["value"] for i in stage_instructions(parser, "api")}
    assert "/health" in api["HEALTHCHECK"] and api["ENTRYPOINT"] == '["acestep-api"]'


def test_infra_builds_the_targets_that_exist():
    stack = "".join(p.read_text() for p in sorted((ROOT / "infra").rglob("*.py")) if "node_modules" not in p.parts)
    targets = set(re.findall(r'target="(\w+)"', stack))
    assert targets == {"worker", "lambda"}  # the stack's image assets: found, so the check below is not vacuous
    assert targets <= set(stages(parse_dockerfile(ROOT / "Dockerfile")))


def _docker_engine() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    return None if info.returncode == 0 else "no Docker engine (`docker info`: " + \
        (info.stderr.strip().splitlines() or ["failed"])[-1] + ")"


# The worker image pulls several GB of CUDA libraries: built when ACESTEP_DOCKER_BUILD_WORKER=1.
BUILT_TARGETS = ["api", "lambda"] + (["worker"] if os.environ.get("ACESTEP_DOCKER_BUILD_WORKER") == "1" else [])


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("target", BUILT_TARGETS)
def test_image_builds(target):
    reason = _docker_engine()
    if reason:
        pytest.skip(reason)
    tag = f"acestep-{target}:test"
    subprocess.run(["docker", "build", "--target", target, "-t", tag, str(ROOT)], check=True, timeout=3500)
    if target != "lambda":
        config = json.loads(subprocess.run(["docker", "image", "inspect", tag], check=True, capture_output=True,
                                           text=True).stdout)[0]["Config"]
        assert config["Healthcheck"]["Test"][0] == "CMD"

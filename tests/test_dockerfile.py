"""The Dockerfile has the targets the CDK stack builds, and the build context keeps weights out."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stages():
    text = (ROOT / "Dockerfile").read_text()
    return {name: base for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I)}, text


def test_worker_and_lambda_targets_exist():
    stages, text = _stages()
    assert {"worker", "lambda"} <= set(stages)
    lambda_stage = text.split("AS lambda", 1)[1]
    assert 'CMD ["entrypoints.lambda_api.handler"]' in lambda_stage
    installs = re.findall(r"pip install[^\n]*", lambda_stage)
    assert installs and not any("[" in line for line in installs)  # no extras: no engine, no torch
    worker_stage = text.split("AS worker", 1)[1].split("AS lambda", 1)[0]
    assert 'ENTRYPOINT ["acestep-worker"]' in worker_stage and '".[engine]"' in worker_stage


def test_build_context_excludes_everything_but_the_sources():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # default deny: checkpoints/, data/, .venv never reach the image
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "engine", "service", "handlers"}


def test_infra_builds_the_targets_that_exist():
    stages, _ = _stages()
    stack = (ROOT / "infra" / "acestep_stack.py").read_text()
    assert set(re.findall(r'target="(\w+)"', stack)) <= set(stages)

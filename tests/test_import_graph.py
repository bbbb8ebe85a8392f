"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and would catch a breach.

    entrypoints -> handlers -> service -> engine's torch-free contract (request, types, plan)
    entrypoints -> engine (the worker's engine is loaded by the bootstrap only)
    infra (the CDK app) -> engine.lm.backend_choice (the LM rule cdk synth checks), nothing else of engine
    handlers, service, infra and the engine's contract (with lm.backend_choice) never reach torch,
    diffusers, transformers, vllm, numpy or soundfile, directly or through another module (the API's
    Lambda cold start, cdk synth)
    no circle among the modules and sub-packages of engine, service or handlers (engine.weights once
    imported engine.weights.checkpoints and was imported back by it)

import-linter reads every import statement, also one inside a function or under TYPE_CHECKING, so a
lazy import that would only run in production cannot slip past.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = 4


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # --no-cache: no .import_linter_cache in the tree; the whole graph takes about a second.
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache", "--no-logo"],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_import_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0 and f"Contracts: {CONTRACTS} kept, 0 broken." in run.stdout, run.stdout + run.stderr


def _module(root: Path, name: str, source: str) -> None:
    path = root.joinpath(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for package in [path.parent, *path.parent.parents][: len(name.split(".")) - 1]:
        (package / "__init__.py").touch()
    path.write_text(source)


def test_each_contract_catches_its_breach(tmp_path):
    """The same contracts on a tree with one breach of each: an upward import, a reach past the
    engine's contract, a torch import two hops away inside a function, a torch import in the LM rule the
    CDK app checks, and a circle."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    _module(tmp_path, "entrypoints.main", "import handlers.app\nimport engine.service\n")
    _module(tmp_path, "handlers.app", "import service.core\nfrom engine import request\n")
    _module(tmp_path, "service.core", "import engine.weights.checkpoints\nimport engine.plan\n")
    _module(tmp_path, "engine.request", "")
    _module(tmp_path, "engine.adapter_manifest", "")  # named by the contracts: it must exist
    _module(tmp_path, "engine.plan", "import engine.types\n")
    _module(tmp_path, "engine.types", "def load():\n    import engine.numbers\n")
    _module(tmp_path, "engine.numbers", "def heavy():\n    import numpy\n")
    _module(tmp_path, "engine.weights.checkpoints", "import service.core\n")
    _module(tmp_path, "engine.service", "import torch\n")
    _module(tmp_path, "infra.worker_engine", "from engine.lm import backend_choice\n")
    _module(tmp_path, "engine.lm.backend_choice", "import torch\n")
    _module(tmp_path, "engine.config", "import engine.weights.checkpoints\n")
    _module(tmp_path, "engine.weights.__init__", "def demo():\n    import engine.config\n")  # the circle
    run = _lint(tmp_path)
    out = run.stdout
    assert run.returncode == 1 and f"Contracts: 0 kept, {CONTRACTS} broken." in out, out + run.stderr
    assert "engine.weights.checkpoints -> service.core" in out  # upward
    assert "service.core -> engine.weights.checkpoints" in out  # past the contract
    assert "engine.plan -> engine.types" in out and "engine.numbers -> numpy" in out  # the chain to numpy
    assert "engine.lm.backend_choice -> torch" in out and "infra is not allowed to import torch" in out
    assert "No cycles are allowed in engine" in out and "No cycles are allowed in service" not in out
    assert "entrypoints.main" not in out and "handlers.app -> engine.request" not in out  # allowed ones

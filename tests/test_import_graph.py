"""The layers import downward only, and the API side never imports the heavy ML stack.

    entrypoints -> handlers -> service -> engine's torch-free contract (request, types, plan)
    entrypoints -> engine (the worker's engine is loaded by the bootstrap only)

Checked on the source (every import statement, also inside functions), so a lazy import that
would only run in production cannot slip past.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("entrypoints", "handlers", "service", "engine")
HEAVY = ("torch", "diffusers", "transformers", "vllm", "numpy", "soundfile")
# engine modules the API and the service core may use: they import nothing heavy.
ENGINE_CONTRACT = ("engine.request", "engine.types", "engine.plan")

# package -> project packages it must not import
FORBIDDEN = {
    "engine": ("entrypoints", "handlers", "service"),
    "service": ("entrypoints", "handlers"),
    "handlers": ("entrypoints",),
    "entrypoints": (),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]  # `from engine import plan`
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_imports(package):
    bad = []
    for path in _modules(package):
        for name in _imports(path):
            if _top(name) in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ("handlers", "service"))
def test_api_side_stays_light(package):
    """handlers/ and service/ reach engine only through its torch-free contract modules."""
    bad = []
    for path in _modules(package):
        for name in _imports(path):
            if _top(name) in HEAVY:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif _top(name) == "engine" and name != "engine" and not name.startswith(ENGINE_CONTRACT):
                bad.append(f"{path.relative_to(ROOT)} imports {name} (only {', '.join(ENGINE_CONTRACT)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ENGINE_CONTRACT)
def test_engine_contract_is_torch_free(module):
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    heavy = [n for n in _imports(path) if _top(n) in HEAVY]
    engine_deps = [n for n in _imports(path) if _top(n) == "engine" and not n.startswith(ENGINE_CONTRACT)]
    assert not heavy and not engine_deps, (heavy, engine_deps)

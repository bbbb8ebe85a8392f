"""Build the Lambda zip-asset directory without Docker: base dependencies + our packages, no torch.

    python infra/package_lambda.py build/lambda
    cd infra && cdk deploy -c lambda_asset_dir=../build/lambda

Wheels are fetched for Lambda's platform (manylinux x86_64, CPython LAMBDA_PYTHON), so this works
from any machine with pip and network access to PyPI. The stack deploys the zip on that runtime
with SnapStart.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The Lambda runtime of the zip. 3.12 and later have SnapStart; 3.13 is the one the package was run under.
LAMBDA_PYTHON = "3.13"
PACKAGES = ("entrypoints", "handlers", "service", "engine")  # engine: only the torch-free request model is imported


def base_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def main(out: str) -> None:
    target = Path(out).resolve()
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
                    "--platform", "manylinux2014_x86_64", "--implementation", "cp", "--python-version", LAMBDA_PYTHON,
                    "--only-binary=:all:", *base_dependencies()], check=True)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (target / "torch").exists():
        raise SystemExit("torch ended up in the Lambda package")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 1e6
    print(f"Lambda package in {target}: {size:.0f} MB unzipped (limit 250 MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "build" / "lambda"))

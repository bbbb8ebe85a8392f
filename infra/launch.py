"""cdk.json's `app`: run app.py under the project's venv, so `npx cdk synth` works from a shell with no venv active.

Stdlib only (it runs under whatever `python3` the shell has). A missing venv, or one without the CDK
libraries, stops with the command that installs them instead of `No module named 'aws_cdk'`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
VENV = Path(os.environ.get("ACESTEP_VENV") or INFRA.parent / ".venv")
INSTALL = "make infra-deps   (or: python3 -m venv .venv && .venv/bin/pip install -e '.[infra]')"


def venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        sys.exit(f"infra: no Python venv at {VENV}. From the repository root, run:\n    {INSTALL}")
    has_cdk = subprocess.run([str(python), "-c", "import importlib.util as u, sys; "
                              "sys.exit(not (u.find_spec('aws_cdk') and u.find_spec('cdk_nag')))"])
    if has_cdk.returncode != 0:
        sys.exit(f"infra: the venv at {VENV} lacks the CDK libraries. From the repository root, run:\n    {INSTALL}")
    return python


def main() -> None:
    python = venv_python()
    os.execv(python, [str(python), str(INFRA / "app.py"), *sys.argv[1:]])


if __name__ == "__main__":
    main()

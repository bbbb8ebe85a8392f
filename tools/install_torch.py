"""Install the locked torch for this machine into the running interpreter's environment (`make run`).

    python tools/install_torch.py [--spec torch==2.13.0] [--build auto|cpu|cuda] [--index URL] [--dry-run]

Order of attempts (the first that installs wins):
  - torch already importable: left alone (a build you installed yourself stays).
  - no NVIDIA GPU (`nvidia-smi` finds none): a torch wheel this machine provides locally (pip's configured
    find-links), else the CPU build from PyTorch's CPU index;
  - an NVIDIA GPU: the CUDA build from PyTorch's index for the driver (cu130 needs driver 580+, else cu126);
  - last: pip's default index (PyPI's Linux wheel is the CUDA 13.0 build, ~2.7 GB), with a warning.
An index that does not answer fails within PIP_TIMEOUT seconds and the next attempt runs: no hang.
torch is installed without its dependencies here; `pip install -c constraints.txt '.[engine]'` brings them
from the lock. Overrides: TORCH_BUILD=cpu|cuda (make variable or environment), TORCH_INDEX=<index URL>.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PYTORCH_INDEX = "https://download.pytorch.org/whl"
CUDA13_MIN_DRIVER = 580  # CUDA 13.0 wheels need an r580+ driver; older drivers get the CUDA 12.6 build
PIP_TIMEOUT = 15  # seconds per connection attempt, so an unreachable index fails fast


@dataclass(frozen=True)
class Attempt:
    label: str
    pip_args: tuple[str, ...]  # after `pip install`


def locked_spec(lock: Path = ROOT / "constraints.txt") -> str:
    for line in lock.read_text().splitlines():
        match = re.match(r"^torch==([^\s;]+)", line)
        if match:
            return f"torch=={match.group(1)}"
    raise SystemExit(f"torch is not pinned in {lock}")


def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver version when `nvidia-smi` sees a GPU, else None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = out.stdout.split()
    return versions[0] if out.returncode == 0 and versions else None


def cuda_index(driver: str) -> str:
    major = re.match(r"\d+", driver)
    recent = major is not None and int(major.group()) >= CUDA13_MIN_DRIVER
    return f"{PYTORCH_INDEX}/{'cu130' if recent else 'cu126'}"


def plan(spec: str, build: str, driver: Optional[str], index: str = "") -> list[Attempt]:
    """The installs to try, in order, for this machine (`driver`: nvidia-smi's, None without a GPU)."""
    if build not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"TORCH_BUILD={build!r}: use auto, cpu or cuda")
    cuda = build == "cuda" or (build == "auto" and driver is not None)
    fetch = ("--no-deps", "--timeout", str(PIP_TIMEOUT), "--retries", "1")
    attempts = []
    if index:
        attempts.append(Attempt(f"torch from {index} (TORCH_INDEX)", (*fetch, "--index-url", index, spec)))
    elif cuda:
        url = cuda_index(driver or str(CUDA13_MIN_DRIVER))
        attempts.append(Attempt(f"the CUDA build from {url}", (*fetch, "--index-url", url, spec)))
    else:
        attempts.append(Attempt("a torch wheel this machine provides (pip's find-links)", ("--no-deps", "--no-index", spec)))
        attempts.append(Attempt(f"the CPU build from {PYTORCH_INDEX}/cpu", (*fetch, "--index-url", f"{PYTORCH_INDEX}/cpu", spec)))
    attempts.append(Attempt("pip's default index (on Linux PyPI's wheel is the CUDA build)", (*fetch, spec)))
    return attempts


def install(attempts: Sequence[Attempt], pip: Sequence[str] = (sys.executable, "-m", "pip", "install", "--quiet"),
            log=print) -> Attempt:
    for attempt in attempts:
        log(f"torch: trying {attempt.label}")
        if subprocess.run([*pip, *attempt.pip_args]).returncode == 0:
            return attempt
        log(f"torch: {attempt.label} failed; next")
    raise SystemExit("torch could not be installed from any source (see above); install it into the venv yourself "
                     "and run make again")


def torch_present() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="", help="requirement (default: the lock's torch pin)")
    parser.add_argument("--build", default=os.environ.get("TORCH_BUILD") or "auto", help="auto, cpu or cuda")
    parser.add_argument("--index", default=os.environ.get("TORCH_INDEX", ""), help="index URL to install torch from")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    spec = args.spec or locked_spec()
    driver = nvidia_driver()
    attempts = plan(spec, args.build, driver, args.index)
    if args.dry_run:
        print(f"GPU driver: {driver or 'none'}")
        for attempt in attempts:
            print(f"{attempt.label}: pip install {' '.join(attempt.pip_args)}")
        return
    if torch_present():
        print("torch: already installed in this environment, left alone (remove it to reinstall)")
        return
    chosen = install(attempts)
    if chosen is attempts[-1] and len(attempts) > 1:
        print("torch: WARNING: installed from pip's default index; on Linux that is the CUDA build, set "
              "TORCH_BUILD / TORCH_INDEX to choose", file=sys.stderr)


if __name__ == "__main__":
    main()

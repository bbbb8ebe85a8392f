"""Wheels for the packages bench/gpu.py needs that a lent GPU machine lacks, at the lock's versions.

The lent machine (/work/.library/device/KINDS.md) has Python 3.12 with a CUDA torch, transformers, peft,
accelerate, safetensors, huggingface-hub, numpy and pyyaml, but no package index and none of the names below: they
travel with the working tree (`carry`, 64 MiB in all; these are ~14 MiB) and are installed there with --no-deps.
vLLM cannot travel (its wheel is hundreds of MiB and pins its own torch): there the LM's vLLM row says it was
skipped and why. Run here, then see bench/RESULTS.md, "GPU benchmark", for the device command:

    .venv/bin/python bench/gpu_wheels.py            # writes .gpu-wheels/*.whl (git-ignored)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the engine imports (or a dependency of it needs) that the lent machine's image does not hold
PACKAGES = ("diffusers", "torchao", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
            "typing-extensions", "soundfile", "cffi", "pycparser", "soxr", "importlib-metadata", "lazy-importer")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def pins(lock: Path) -> dict[str, str]:
    """name -> version from constraints.txt (lines `name==version`; markers ignored: those of PACKAGES hold on 3.12)."""
    found = {}
    for line in lock.read_text().splitlines():
        spec = line.split(";")[0].strip()
        if "==" in spec and not spec.startswith("#"):
            name, version = spec.split("==", 1)
            found[name.strip().lower()] = version.strip()
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=str(ROOT / ".gpu-wheels"))
    p.add_argument("--python-version", default="3.12", help="the lent machine's Python")
    args = p.parse_args(argv)
    locked = pins(ROOT / "constraints.txt")
    missing = [name for name in PACKAGES if name not in locked]
    if missing:
        p.error(f"not pinned in constraints.txt: {', '.join(missing)}")
    specs = [f"{name}=={locked[name]}" for name in PACKAGES]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", args.python_version, "--implementation", "cp", "-d", args.dest]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + specs, check=True)
    wheels = sorted(Path(args.dest).glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make run`'s torch install (tools/install_torch.py): the CPU build without a GPU (a local wheel first), the
CUDA build for the driver with one, overrides, and an unreachable index that fails fast into the next source."""
from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

import pytest

from tools.install_torch import PIP_TIMEOUT, Attempt, install, locked_spec, plan

ROOT = Path(__file__).resolve().parents[1]
SPEC = "torch==2.13.0"


def labels(attempts):
    return [a.label for a in attempts]


def test_without_a_gpu_the_local_wheel_then_the_cpu_index_then_the_default():
    attempts = plan(SPEC, "auto", driver=None)
    assert attempts[0].pip_args == ("--no-deps", "--no-index", SPEC)  # only what this machine provides
    assert attempts[1].pip_args[-3:] == ("--index-url", "https://download.pytorch.org/whl/cpu", SPEC)
    assert attempts[2].pip_args[-1] == SPEC and "--index-url" not in attempts[2].pip_args


@pytest.mark.parametrize("driver, index", [("590.48.01", "cu130"), ("580.65.06", "cu130"), ("550.54.15", "cu126")])
def test_with_a_gpu_the_cuda_build_for_its_driver(driver, index):
    first = plan(SPEC, "auto", driver=driver)[0]
    assert first.pip_args[-3:] == ("--index-url", f"https://download.pytorch.org/whl/{index}", SPEC)


def test_overrides():
    assert "CPU build" in plan(SPEC, "cpu", driver="590.48.01")[1].label  # TORCH_BUILD=cpu on a GPU machine
    assert "/cu130" in plan(SPEC, "cuda", driver=None)[0].label  # TORCH_BUILD=cuda without nvidia-smi
    custom = plan(SPEC, "auto", driver=None, index="https://example.invalid/whl/cu128")[0]
    assert custom.pip_args[-3:] == ("--index-url", "https://example.invalid/whl/cu128", SPEC)
    with pytest.raises(SystemExit, match="TORCH_BUILD"):
        plan(SPEC, "rocm", driver=None)


def test_every_network_attempt_has_a_short_timeout():
    for attempts in (plan(SPEC, "auto", None), plan(SPEC, "auto", "590.1"), plan(SPEC, "auto", None, "http://x")):
        for attempt in attempts:
            if "--no-index" not in attempt.pip_args:
                args = attempt.pip_args
                assert int(args[args.index("--timeout") + 1]) <= PIP_TIMEOUT <= 30 and "--retries" in args


def test_the_spec_is_the_locks_and_the_makefiles():
    assert locked_spec() == SPEC
    assert re.search(r"^TORCH_SPEC \?= torch==2\.13\.0$", (ROOT / "Makefile").read_text(), re.M)


def _wheel(folder: Path, name: str = "tinypkg", version: str = "1.0") -> Path:
    files = {f"{name}/__init__.py": b"VALUE = 1\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items())
    files[f"{name}-{version}.dist-info/RECORD"] = (record + f"{name}-{version}.dist-info/RECORD,,\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
    return path


def test_an_unreachable_index_falls_through_to_the_next_source(tmp_path):
    """Real pip: the first source refuses the connection, the second (a local folder) installs."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    target = tmp_path / "target"
    fetch = ("--no-deps", "--timeout", str(PIP_TIMEOUT), "--retries", "1")
    attempts = [Attempt("unreachable", (*fetch, "--index-url", "http://127.0.0.1:9/simple", "tinypkg==1.0")),
                Attempt("local", ("--no-deps", "--no-index", "--find-links", str(wheels), "tinypkg==1.0"))]
    said: list[str] = []
    pip = (sys.executable, "-m", "pip", "install", "--isolated", "--quiet", "--no-compile", "--target", str(target))
    assert install(attempts, pip=pip, log=said.append) is attempts[1]
    assert (target / "tinypkg" / "__init__.py").exists()
    assert said == ["torch: trying unreachable", "torch: unreachable failed; next", "torch: trying local"]

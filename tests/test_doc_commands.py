"""The commands the docs name in running text (`...` spans) and in indented blocks, each held to what it says.

README.md's and infra/README.md's fenced blocks run as written in tests/test_readme_snippets.py and
tests/test_infra_readme.py; this module takes every other command in README.md, infra/README.md and
bench/RESULTS.md. Each one must be in COMMANDS (a new one fails `test_every_command_is_handled` until it is):
- RUN: run as written, from a fresh folder, as a newcomer's shell would (no venv active);
- PARSE: its program starts and parses the whole command line with its own argparse parser, then is stopped
  before it works (a benchmark at full size, on a GPU, for minutes): a flag the program lacks or a bad value
  fails. All of them are parsed in one fresh interpreter (tests/doc_command_parser.py);
- the usage lines `acestep-models --help` prints are parsed the same way;
- HELP: a name in prose (a subcommand, a flag): `<it> --help` runs and lists each flag named;
- MAKE: a make target and its `VAR=value`: `make -n` accepts it, and the variable is the Makefile's;
- Covered / SetAside: run elsewhere (the test named must exist), or not runnable here (the reason, and a
  check of what can be checked).
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "infra/README.md", "bench/RESULTS.md")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
ASSIGNMENTS = re.compile(r"^(?:[A-Z][A-Z0-9_]*=\S+\s+)*")
PROGRAM = re.compile(r"^(make|python3?|pip|pytest|acestep(-api|-worker|-models)?|npx|docker|aws|curl|nice|grep|sudo|"
                     r"debootstrap|chroot|\.venv/bin/\S+|bench/\S+\.py)$")


def doc_commands(text: str) -> list[str]:
    """Inline code spans (one line break allowed) and indented code lines that start with a program, in order."""
    text = FENCE.sub("", text)
    found = [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", text)]
    for block in re.findall(r"^\n((?:^    \s*\S.*\n)+)", text, re.M):
        joined = re.sub(r"\\\n\s*", "", block)
        found += [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
    commands = []
    for span in found:
        rest = ASSIGNMENTS.sub("", span)
        if " " in span and rest and PROGRAM.match(rest.split()[0]) and span not in commands:
            commands.append(span)
    return commands


def all_doc_commands() -> list[str]:
    return list(dict.fromkeys(c for doc in DOCS for c in doc_commands((ROOT / doc).read_text())))


# --- how each command is held -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Run as written in bash from a fresh folder; `expect`: the exit codes that mean success."""
    expect: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Parse:
    """Parsed by the program's own parser (tests/doc_command_parser.py); `run` instead runs it to its end."""
    placeholders: tuple[tuple[str, str], ...] = ()
    run: bool = False


@dataclass(frozen=True)
class Help:
    """A program or subcommand named in prose: its --help runs and lists every flag named."""


@dataclass(frozen=True)
class Make:
    """A make target with its VAR=value settings."""


@dataclass(frozen=True)
class Covered:
    """Run as written by another test."""
    test: str  # tests/<file>.py::<test>


@dataclass(frozen=True)
class SetAside:
    """Not runnable here; why, and what is checked of it instead (None: nothing can be)."""
    reason: str
    check: Optional[Callable[[], None]] = None
    covered_by: str = ""


Handling = Union[Run, Parse, Help, Make, Covered, SetAside]

PY = ".venv/bin/python"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def check_gpu_extra() -> None:
    assert "gpu" in pyproject()["project"]["optional-dependencies"]


def check_test_extra(package: str) -> Callable[[], None]:
    def check() -> None:  # the tests verify with it (installed from the lock with the test extras)
        extras = pyproject()["project"]["optional-dependencies"]
        assert any(re.match(rf"{package}\b", req) for reqs in extras.values() for req in reqs), package
    return check


def check_worker_stage_and_vllm_arg() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS worker$", dockerfile, re.M) and re.search(r"^ARG WITH_VLLM=", dockerfile, re.M)


def check_soak_command(command: str) -> Callable[[], None]:
    """The soak run's environment variables are the ones tests/test_soak.py reads, and its marker selects it."""
    def check() -> None:
        words = shlex.split(command)
        names = [w.split("=", 1)[0] for w in words if re.match(r"^[A-Z][A-Z0-9_]*=", w)]
        soak = (ROOT / "tests" / "test_soak.py").read_text()
        read = set(re.findall(r"os\.environ\.get\(\"(\w+)\"", soak))
        assert names and set(names) <= read, (names, read)
        python = words[words.index("-m") - 1]
        assert python == PY, f"{python}: a newcomer's shell has no venv active; use {PY} -m pytest"
        assert words[words.index("-m") + 1] == "pytest" and "tests/test_soak.py" in words
        assert words[words.index("tests/test_soak.py") + 1:][:2] == ["-m", "soak"]
        assert any(m.startswith("soak:") for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"])
        if "-k" in words:
            names_in_file = {n.name for n in ast.walk(ast.parse(soak)) if isinstance(n, ast.FunctionDef)}
            assert any(words[words.index("-k") + 1] in n for n in names_in_file if n.startswith("test_"))
    return check


def check_cpuinfo_grep() -> None:
    """grep exits 0 (a bf16 CPU) or 1 (none): both answer the README's question; 2 would be a broken pattern."""
    run = subprocess.run(["bash", "-c", "grep -o 'amx_bf16\\|avx512_bf16' /proc/cpuinfo"], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode in (0, 1), run.stderr


LENT_GPU_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-wheels/*.whl "
    "&& export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 || exit; nvidia-smi -L; timeout 200 python3 "
    "bench/gpu.py --parts lm --work-dir /tmp/w --out $OUT/gpu-lm; timeout 360 python3 bench/gpu.py --parts configs "
    "batching --work-dir /tmp/w --out $OUT/gpu-songs")


def check_lent_gpu_command() -> None:
    """Each bench/gpu.py run in it parses with gpu.py's own parser, and the wheels it installs are the lock's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu
    import gpu_wheels

    runs = re.findall(r"python3 bench/gpu\.py ([^;]+)", LENT_GPU_COMMAND)
    assert len(runs) == 2
    for run in runs:
        args = gpu.parse_args(shlex.split(run.replace("$OUT", "/tmp/out")))
        assert args.device == "cuda" and args.work_dir == "/tmp/w"
    locked = gpu_wheels.pins(ROOT / "constraints.txt")
    assert all(name in locked for name in gpu_wheels.PACKAGES)


SNAPSTART_CHROOT = "needs root and a Debian mirror (a CPython 3.13 chroot); bench/lambda_snapstart.py's docstring " \
                   "has the steps"
SOAK_RUN_2 = (f"ACESTEP_SOAK_TASKS=5000 ACESTEP_SOAK_KILL_EVERY=0.5 ACESTEP_SOAK_API_KILLS=6 nice -n 10 {PY} -m pytest "
              "tests/test_soak.py -m soak -s -k hostile")
COMMANDS: dict[str, Handling] = {
    # --- README.md
    "make lock": Make(),
    "make run": Covered("tests/test_readme_snippets.py::test_readme_block_runs_as_written"),
    "make run TORCH_BUILD=cpu": Make(),
    "acestep-models list": Covered("tests/test_readme_snippets.py::test_readme_block_runs_as_written"),
    "acestep-models download": Help(),
    f"OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 {PY} bench/memory_table.py --threads 2": Parse(),
    "bench/song_cpu.py --batch-size 1": Parse(),
    "grep -o 'amx_bf16\\|avx512_bf16' /proc/cpuinfo": SetAside(
        "its exit code is the answer: 1 on a CPU without bf16, which this test must not fail on",
        check=check_cpuinfo_grep),
    "sudo apt-get install curl jq": SetAside(
        "needs root; tests/test_readme_snippets.py skips the curl block naming this command when curl or jq is "
        "missing"),
    "pip install openai": Covered("tests/test_readme_snippets.py::test_readme_block_runs_as_written"),
    f"{PY} chat.py": Covered("tests/test_readme_snippets.py::test_readme_block_runs_as_written"),
    f"{PY} generate.py": Covered("tests/test_readme_snippets.py::test_readme_block_runs_as_written"),
    "pip install standardwebhooks": SetAside(
        "installs into a webhook receiver's own environment; the tests verify deliveries with that library",
        check=check_test_extra("standardwebhooks"), covered_by="tests/test_webhooks.py"),
    f"{PY} -m service.embedded.signing_secret rotate-webhook ./data": Parse(run=True),
    f"{PY} -m service.embedded.signing_secret rotate ./data": Parse(run=True),
    "aws secretsmanager put-secret-value": SetAside(
        "needs an AWS account; the service reading a rotated secret (current and previous) runs against moto",
        covered_by="tests/test_fault_signing.py"),
    "acestep adapters delete NAME": Parse(),
    "acestep status ID": Parse(),
    "make test": Covered("tests/test_readme_snippets.py::test_readme_block_runs_as_written"),
    "make browser": Make(),
    "pip install ./client": Covered(
        "tests/test_client_package.py::test_a_fresh_venv_with_only_httpx_and_tqdm_runs_the_client_and_the_cli"),
    SOAK_RUN_2: SetAside("a four-minute soak, never in make test", check=check_soak_command(SOAK_RUN_2)),
    "pip install '.[gpu]'": SetAside("CUDA vLLM, for a GPU worker", check=check_gpu_extra),
    "docker build --target worker --build-arg WITH_VLLM=true": SetAside(
        "needs a Docker engine (none here)", check=check_worker_stage_and_vllm_arg,
        covered_by="tests/test_dockerfile.py::test_image_builds"),
    "make test-vllm": Make(),
    ".venv/bin/acestep-api --help": Run(),
    f"{PY} bench/engine.py --full-size --device cuda": Parse(),  # GPU: README and infra/README
    "docker compose up -d --build": SetAside(
        "needs a Docker engine and an NVIDIA GPU; the file is checked against the Compose schema",
        covered_by="tests/test_compose.py::test_docker_compose_config_accepts_it"),
    "docker compose ps": SetAside("needs a Docker engine with the stack up",
                                  covered_by="tests/test_compose.py::test_docker_compose_config_accepts_it"),
    "docker compose config": Covered("tests/test_compose.py::test_docker_compose_config_accepts_it"),
    # --- infra/README.md
    "aws configure": SetAside(
        "the operator's AWS credentials; every infra command runs without them here",
        covered_by="tests/test_infra_readme.py::test_every_command_is_run_or_has_a_reasoned_stand_in"),
    "acestep-models publish": Help(),
    "acestep-models publish --bucket": Help(),
    "npx cdk deploy -c name=value": Covered(
        "tests/test_infra_readme.py::test_the_readme_synthesizes_the_default_path_and_the_prebuilt_one"),
    "npx cdk destroy": Covered("tests/test_infra_readme.py::test_every_command_is_run_or_has_a_reasoned_stand_in"),
    "acestep-worker --healthcheck --heartbeat-file /tmp/acestep-heartbeat.json": Parse(),
    ".venv/bin/moto_server -p 5000": Parse(),  # serves until stopped: test_infra_readme_python_runs_against_moto
    # --- bench/RESULTS.md (the commands that produced its figures)
    f"{PY} bench/gc_pauses.py --requests 20000 --rounds 2": Parse(),
    f"{PY} bench/lambda_cold_start.py --runs 7": Parse(),
    f"{PY} bench/load.py --rate 500 --seconds 10": Parse(),
    f"{PY} bench/load.py --seconds 5": Parse(),
    f"{PY} bench/load.py --seconds 5 --server-repo <worktree of ccb9f22>": Parse(
        placeholders=(("<worktree of ccb9f22>", "/tmp/worktree"),)),
    f"ACESTEP_WORKER_NICE=0 {PY} bench/load.py --seconds 5 --only query20 --busy-worker": Parse(),
    f"{PY} bench/wake_latency.py --rounds 60": Parse(),
    f"{PY} bench/lambda_cold_start.py --runs 5": Parse(),
    "nice -n 5": SetAside("a prefix named in prose, not a command"),
    "nice -n 10": SetAside("a prefix named in prose, not a command"),
    f"{PY} bench/pipeline.py --full-size --device cuda": Parse(),
    "bench/engine.py --full-size --device cuda": Parse(),
    f"nice -n 5 {PY} bench/pipeline.py --durations 30 240 --batches 1 2 4 --tasks 3": Parse(),
    f"{PY} bench/engine.py --repeats 3": Parse(),
    f"{PY} bench/engine.py --full-size --device cuda --repeats 3": Parse(),
    f"{PY} bench/lm.py --seconds 240": Parse(),
    "make bench-lm": Make(),
    "python -m entrypoints.api_server --workers 0": Parse(),
    f"{PY} bench/format_burst.py": Parse(),
    f"nice -n 10 {PY} bench/vae_cpu.py --durations 10 30 60 --dtypes bfloat16": Parse(),
    f"nice -n 10 {PY} bench/vae_cpu.py --durations 10 --dtypes bfloat16 float32 --fold both": Parse(),
    f"{PY} bench/adapters.py": Parse(),
    "bench/adapters.py --full-size --repeats 2": Parse(),
    f"OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 {PY} bench/lm.py --full-size --steps 24 --threads 2": Parse(),
    f"OMP_WAIT_POLICY=PASSIVE {PY} bench/quantize.py --seconds 30 --repeats 3 --lm": Parse(),
    "bench/quantize.py --layer --repeats 5": Parse(),
    "make vllm-venv": Make(),
    f"OMP_WAIT_POLICY=PASSIVE {PY} bench/song_cpu.py --batch-size 1 --durations 10 30 --configs bf16 bf16+int8 "
    "float32 --snr --out bench/results/song_cpu_batch1": Parse(),
    "debootstrap --variant=minbase --include=python3 trixie /opt/trixie http://deb.debian.org/debian":
        SetAside(SNAPSTART_CHROOT),
    f"{PY} infra/package_lambda.py /opt/trixie/tmp/lambda": SetAside(
        SNAPSTART_CHROOT + "; the same packaging into another folder runs in infra/README.md's test",
        covered_by="tests/test_infra_readme.py::test_the_readme_synthesizes_the_default_path_and_the_prebuilt_one"),
    ".venv/bin/pip install --no-deps --target /opt/trixie/tmp/lambda snapshot-restore-py": SetAside(SNAPSTART_CHROOT),
    f"{PY} bench/lambda_snapstart.py --runs 5 --python \"chroot /opt/trixie /usr/bin/python3.13\" --package "
    "/opt/trixie/tmp/lambda --package-inside /tmp/lambda": Parse(),
    f"ACESTEP_SOAK_TASKS=5000 {PY} -m pytest tests/test_soak.py -m soak -s -p no:cacheprovider -k hostile": SetAside(
        "a soak run, never in make test", check=check_soak_command(
            f"ACESTEP_SOAK_TASKS=5000 {PY} -m pytest tests/test_soak.py -m soak -s -p no:cacheprovider -k hostile")),
    f"{PY} bench/format_latency.py": Parse(),
    f"{PY} bench/gpu.py": Parse(),
    f"{PY} bench/gpu_wheels.py": Parse(),
    f"HF_HUB_OFFLINE=1 {PY} bench/fuzz_api.py --examples 300": Parse(),
    f"HF_HUB_OFFLINE=1 {PY} bench/hostile_api.py": Parse(),
    LENT_GPU_COMMAND: SetAside("runs on a lent GPU machine through the device tool, with the wheels carried",
                               check=check_lent_gpu_command),
    "python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -e '.[engine,gpu]'": SetAside(
        "CUDA vLLM and its torch need a GPU machine with a package index", check=check_gpu_extra),
    "bench/gpu.py --device cpu --tiny": Covered(
        "tests/test_engine_bench_gpu.py::test_the_gpu_benchmark_runs_on_cpu_and_writes_its_rows"),
    f"{PY} bench/gpu.py --device cpu --parts configs batching --configs bf16 --durations 10 --batch-song 10 "
    "--batch-sizes 1 2 --work-dir /tmp/gpubench/work --out /tmp/gpubench/song": Parse(),
    f"OMP_WAIT_POLICY=PASSIVE {PY} bench/vae_cpu.py --durations 10 30 --dtypes bfloat16 --decoders stock fast "
    "fast-eager --reference --cold-compile": Parse(),
    f"OMP_WAIT_POLICY=PASSIVE {PY} bench/song_cpu.py": Parse(),
    f"OMP_WAIT_POLICY=PASSIVE {PY} bench/song_cpu.py --configs float32 --durations 10": Parse(),
    f"OMP_WAIT_POLICY=PASSIVE {PY} bench/song_cpu.py --durations 10 --configs bf16 bf16+int8 float32 --snr "
    "--vae-check --poll-limit-s 60 --out bench/results/song_cpu_snr": Parse(),
    f"{PY} bench/vae_cpu.py --stage encode --durations 30 --dtypes bfloat16 --decoders stock fast": Parse(),
}


def commands_of(kind: type) -> list[str]:
    return [c for c, h in COMMANDS.items() if isinstance(h, kind)]


def test_every_command_is_handled():
    found = all_doc_commands()
    assert len(found) > 40, found  # the extraction still finds the docs' commands
    unknown = [c for c in found if c not in COMMANDS]
    assert not unknown, "commands in the docs that no test runs, parses or sets aside (add them to COMMANDS):\n" + \
        "\n".join(unknown)
    stale = [c for c in COMMANDS if c not in found]
    assert not stale, f"COMMANDS lists commands the docs no longer have: {stale}"


@pytest.mark.parametrize("test_id", sorted({h.test for h in COMMANDS.values() if isinstance(h, Covered)} |
                                           {h.covered_by for h in COMMANDS.values()
                                            if isinstance(h, SetAside) and h.covered_by}))
def test_the_covering_tests_exist(test_id):
    path, _, name = test_id.partition("::")
    assert (ROOT / path).is_file(), path
    if name:
        tree = ast.parse((ROOT / path).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, test_id


@pytest.mark.parametrize("command", commands_of(SetAside))
def test_set_aside_commands_say_why_and_check_what_they_can(command):
    handling = COMMANDS[command]
    assert isinstance(handling, SetAside) and len(handling.reason.split()) >= 5, command
    if handling.check:
        handling.check()


def split_command(command: str, placeholders=()) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of a shell command, `nice -n N` dropped, bench/x.py run by the venv."""
    for placeholder, value in placeholders:
        command = command.replace(placeholder, value)
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words[:2] == ["nice", "-n"]:
        words = words[3:]
    if words[0].startswith("bench/"):  # a benchmark named in prose: run with the project's interpreter
        words = [PY, *words]
    return env, words


def known_environment_names() -> set[str]:
    """Every variable the code reads: the settings, and the names read from os.environ across the packages."""
    names = {"OMP_WAIT_POLICY", "HF_HUB_OFFLINE"}
    for folder in ("service", "engine", "entrypoints", "handlers", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"[\"']((?:ACESTEP|OPENROUTER)_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def help_text_commands() -> dict[str, Handling]:
    """The usage lines of `acestep-models --help` (its module docstring), values filled in: "[--seed N]" ->
    "--seed 1", "diffusers|original" -> "diffusers"; each subcommand of its parser must have one."""
    source = (ROOT / "entrypoints" / "models.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    lines = [line.strip() for line in doc.splitlines() if line.strip().startswith("acestep-models ")]
    subcommands = set(re.findall(r"add_parser\(\"([\w-]+)\"", source))
    assert subcommands and subcommands == {line.split()[1] for line in lines}, (subcommands, lines)
    filled = {}
    for line in lines:
        command = re.sub(r"\s{2,}.*$", "", line).replace("[", "").replace("]", "")
        command = re.sub(r"(\w+)\|[\w|]+", r"\1", command)
        filled[re.sub(r"\bN\b", "1", command)] = Parse()
    return filled


def parse_all(commands: list[str], tmp_path: Path) -> dict[str, dict]:
    requests = []
    for command in commands:
        handling = COMMANDS.get(command) or help_text_commands()[command]
        assert isinstance(handling, Parse)
        env, argv = split_command(command, handling.placeholders)
        requests.append({"argv": argv, "env": env, "mode": "run" if handling.run else "parse"})
    return dict(zip(commands, run_helper(requests, tmp_path)))


def run_helper(requests: list[dict], tmp_path: Path) -> list[dict]:
    """tests/doc_command_parser.py's answers, in one fresh interpreter started in tmp_path."""
    results_file = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACESTEP_", "OPENROUTER_"))}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "doc_command_parser.py"), str(results_file)],
                         input=json.dumps(requests), cwd=tmp_path, env=env | {"HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and results_file.exists(), run.stderr[-3000:]
    return json.loads(results_file.read_text())


@pytest.mark.e2e  # one fresh interpreter (a subprocess) imports every program once
def test_documented_commands_parse_with_their_programs_own_parsers(tmp_path):
    commands = commands_of(Parse) + list(help_text_commands())
    results = parse_all(commands, tmp_path)
    failed = {c: f"{r['detail']}: {r['output'][-600:]}" for c, r in results.items() if not r["ok"]}
    assert not failed, "\n".join(f"{c}\n    -> {why}" for c, why in failed.items())
    runs = {c for c in commands if getattr(COMMANDS.get(c), "run", False)}
    assert all(results[c]["detail"] == ("ran" if c in runs else "parsed") for c in commands)
    # what the commands run to their end did: the rotated secrets, where the documented ./data says
    assert {p.name for p in (tmp_path / "data").iterdir()} >= {"signing-secret.json", "webhook-secret.json"}
    known = known_environment_names()
    for command in commands:
        unknown = set(split_command(command)[0]) - known
        assert not unknown, f"{command}: sets {unknown}, which nothing reads"


@pytest.mark.e2e  # through the same helper: one interpreter
def test_names_in_prose_are_subcommands_and_flags_the_program_has(tmp_path):
    """`acestep-models publish --bucket`: `acestep-models publish --help` answers and lists --bucket."""
    commands = commands_of(Help)
    requests = []
    for command in commands:
        _, argv = split_command(command)
        words = argv[:next((i for i, w in enumerate(argv) if w.startswith("-")), len(argv))]
        requests.append({"argv": [*words, "--help"], "mode": "run"})
    for command, result in zip(commands, run_helper(requests, tmp_path)):
        assert result["ok"], (command, result)
        flags = [w for w in split_command(command)[1] if w.startswith("--")]
        assert "usage:" in result["output"] and all(f in result["output"] for f in flags), (command, result)


@pytest.mark.e2e  # a subprocess
@pytest.mark.parametrize("command", commands_of(Run))
def test_commands_run_as_written(command, tmp_path):
    handling = COMMANDS[command]
    assert isinstance(handling, Run)
    # a fresh folder holding `.venv` (the clone's), with no venv on PATH: a newcomer's shell
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    venv = str(Path(sys.executable).parent.parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and not p.startswith(venv))
    shell_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")
                 and not k.startswith(("ACESTEP_", "OPENROUTER_"))}
    run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=tmp_path,
                         env=shell_env | {"PATH": path, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode in handling.expect, run.stderr


MAKEFILE = (ROOT / "Makefile").read_text()


@pytest.mark.e2e  # make -n
@pytest.mark.parametrize("command", commands_of(Make))
def test_make_targets_and_variables_exist(command):
    words = shlex.split(command)
    assert words[0] == "make"
    target, settings = words[1], [w for w in words[2:] if "=" in w]
    assert re.search(rf"^{re.escape(target)}:", MAKEFILE, re.M), target
    for name in (s.split("=", 1)[0] for s in settings):
        assert re.search(rf"^{name} \?=", MAKEFILE, re.M), f"{name} is not a Makefile variable a caller may set"
    dry = subprocess.run(["make", "-n", "--no-print-directory", *words[1:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr


@pytest.mark.e2e  # moto's server (in a thread)
def test_infra_readme_python_runs_against_moto(tmp_path, monkeypatch):
    """infra/README.md's ```python block (tests/test_infra_readme.py runs its ```bash blocks), run as written
    against moto's server in the shell the text describes: any credentials, nothing else set."""
    from tests.aws_support import moto_server

    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "infra" / "README.md").read_text(), re.M | re.S)
    assert len(blocks) == 1, blocks
    for name in [k for k in os.environ if k.startswith(("ACESTEP_", "AWS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.chdir(tmp_path)  # load_settings reads ./.env: none in a fresh folder
    from service.config import ENV_NAMES

    with moto_server() as endpoint:
        code = blocks[0].replace("http://127.0.0.1:5000", endpoint)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "infra/README.md", "exec"), {"__name__": "__main__"})
        variables = dict(line.split("=", 1) for line in printed.getvalue().splitlines())
        assert set(variables) <= set(ENV_NAMES) and all(variables.values()), variables
        # what they name exists on the endpoint
        import boto3

        aws = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        boto3.client("dynamodb", **aws).describe_table(TableName=variables["ACESTEP_TABLE_NAME"])
        boto3.client("s3", **aws).head_bucket(Bucket=variables["ACESTEP_BUCKET"])
        sqs = boto3.client("sqs", **aws)
        redrive = sqs.get_queue_attributes(QueueUrl=variables["ACESTEP_QUEUE_URL"],
                                           AttributeNames=["RedrivePolicy"])["Attributes"]["RedrivePolicy"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=variables["ACESTEP_DLQ_URL"],
                                           AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        assert json.loads(redrive)["deadLetterTargetArn"] == dlq_arn

"""Every fenced block of README.md, run as written against the service `make run` starts.

The blocks are read from README.md itself, so editing the README changes what runs here. Each block
must be known to SNIPPETS below (a new block fails `test_every_block_is_classified` until it is),
either run or set aside with the reason it is not.

How a block runs, as a newcomer would after `make run` (fresh clone, no venv activated):
- shell blocks in `bash -e -o pipefail`, python blocks with `.venv/bin/python` (the interpreter of
  this test run, which `make test` builds from `make run`'s install); the working folder is a fresh
  directory holding a `.venv` link to that environment, so `.venv/bin/...` and
  `source .venv/bin/activate` mean what they mean in a clone; no ACESTEP_API_* variables set;
- the server is the Makefile's `run` recipe (`$(BIN)/acestep-api`, checked below) started in that
  same folder with its defaults, offline, so it builds and serves the random-weight demo model.

Substitutions, the only edits made to a block's text (SUBSTITUTIONS):
- `http://127.0.0.1:8001` / `:8002`: the test server's two listeners (free ports: the documented
  ones may be taken on a shared machine);
- `1b4e...`: a task id, that of a short task the test submits first.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx
import pytest
import soundfile as sf

from tests.demo_servers import QUICK
from tests.live_server import REPO, LiveServer, free_port, stop_service

# slow: a live service; the generous timeout covers its start and the shared generations on a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

README = Path(REPO) / "README.md"
MAKEFILE = Path(REPO) / "Makefile"
VENV_BIN = Path(sys.executable).parent
TASK_ID_PLACEHOLDER = "1b4e..."
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    index: int
    lang: str
    text: str

    @property
    def first_line(self) -> str:
        return next((line for line in self.text.splitlines() if line.strip()), "")


def readme_blocks() -> list[Block]:
    return [Block(i, m.group(1), m.group(2)) for i, m in enumerate(FENCE.finditer(README.read_text()))]


# --- the service, as `make run` starts it --------------------------------------------------------------

def make_run_command() -> list[str]:
    """The `run` target's recipe, with $(BIN) resolved to this test's environment."""
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", MAKEFILE.read_text(), re.M)
    assert recipe, "the Makefile has no run target"
    lines = [line.strip() for line in recipe.group(1).splitlines()]
    assert lines == ["$(BIN)/acestep-api"], f"the run recipe changed; update this test: {lines}"
    return [str(VENV_BIN / "acestep-api")]


@dataclass
class Service:
    server: LiveServer
    openrouter_url: str
    workdir: Path
    env: dict

    def substitutions(self, task_id: str) -> dict[str, str]:
        return {"http://127.0.0.1:8001": self.server.base_url, "http://127.0.0.1:8002": self.openrouter_url,
                TASK_ID_PLACEHOLDER: task_id}


def newcomer_env() -> dict:
    """The shell of someone who cloned the repository and ran `make run`: no venv active, no client settings."""
    venv = str(VENV_BIN.parent)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACESTEP_", "OPENROUTER_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(venv))
    env["HF_HUB_OFFLINE"] = "1"
    return env


@contextlib.contextmanager
def make_run(workdir: Path) -> Iterator[Service]:
    port, chat_port = free_port(), free_port()
    # Offline (tests never reach the hub); a worker at the test's own CPU priority (a loaded machine).
    env = newcomer_env() | {"ACESTEP_API_PORT": str(port), "OPENROUTER_PORT": str(chat_port),
                            "ACESTEP_ALLOW_DOWNLOAD": "false", "ACESTEP_WORKER_NICE": "0"}
    log_path = workdir.parent / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(make_run_command(), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, str(log_path))
    try:
        server.wait_until("the API", lambda: _answers(server.base_url + "/health") or proc.poll() is not None, 60)
        assert proc.poll() is None, server.log()[-4000:]
        server.wait_for_worker()
        yield Service(server, f"http://127.0.0.1:{chat_port}", workdir, newcomer_env())
    finally:
        stop_service(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("readme") / "clone"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    with make_run(workdir) as svc:
        yield svc


# --- running the blocks ------------------------------------------------------------------------------------

def substitute(text: str, mapping: dict[str, str]) -> str:
    for placeholder, value in mapping.items():
        text = text.replace(placeholder, value)
    return text


class Runs:
    """The runnable blocks, started together once (installs first, as the README orders them): their
    generations then share the worker's batches instead of queueing one after another."""

    def __init__(self, service: Service, blocks: list[Block]):
        self.service = service
        # the id `1b4e...` stands for: a short task of its own
        self.task_id = httpx.post(service.server.base_url + "/release_task",
                                  json={"prompt": "placeholder task", **QUICK}, timeout=10).json()["data"]["task_id"]
        # The CLI's own default is 127.0.0.1:8001; it is pointed at the test server the documented way.
        self.env = service.env | {"ACESTEP_API_URL": service.server.base_url}
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(blocks)))
        self.futures: dict[int, Future] = {}
        for block in (b for b in blocks if classify(b) in INSTALLS):
            self.futures[block.index] = self.pool.submit(self._run, block)
            self.futures[block.index].result()
        for block in (b for b in blocks if classify(b) in RUNS and classify(b) not in INSTALLS):
            self.futures[block.index] = self.pool.submit(self._run, block)

    def _run(self, block: Block) -> subprocess.CompletedProcess:
        text = substitute(block.text, self.service.substitutions(self.task_id))
        script = self.service.workdir / f"snippet_{block.index}.{'py' if block.lang == 'python' else 'sh'}"
        script.write_text(text)
        cmd = [str(VENV_BIN / "python"), script.name] if block.lang == "python" else \
            ["bash", "-e", "-o", "pipefail", script.name]
        return subprocess.run(cmd, cwd=self.service.workdir, env=self.env, capture_output=True, text=True,
                              timeout=240)

    def result(self, block: Block) -> subprocess.CompletedProcess:
        run = self.futures[block.index].result()
        assert run.returncode == 0, f"README block {block.index} ({block.first_line!r}) failed:\n" \
                                    f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{self.service.server.log()[-3000:]}"
        return run


@pytest.fixture(scope="module")
def runs(service) -> Iterator[Runs]:
    started = Runs(service, readme_blocks())
    yield started
    started.pool.shutdown(wait=True)


def needs_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"the README block needs {', '.join(missing)} (sudo apt-get install {' '.join(missing)})")


# --- what each block is and how its output is checked -----------------------------------------------------

def check_make_commands(block: Block, request) -> None:
    """Not run as such: `make run` serves forever (the fixture starts its recipe, `$(BIN)/acestep-api`, in
    the working folder: every other block runs against it); `make test` is this test suite (CI runs it
    through .ci/run); `make test-fast` is its unit-marked part, which this suite runs too: its recipe is
    checked."""
    commands = [line.split("#")[0].strip() for line in block.text.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make run", "make test", "make test-fast"], commands
    assert make_run_command() == [str(VENV_BIN / "acestep-api")]
    # --no-print-directory: under `make test` (MAKELEVEL > 0) make would add "Entering directory" lines
    recipe = subprocess.run(["make", "-n", "--no-print-directory", "test-fast"], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert recipe.stdout.strip().endswith("python -m pytest -m unit -n 2 --dist loadfile"), recipe.stdout
    request.getfixturevalue("service")  # the recipe starts and serves


def check_curl(block: Block, request) -> None:
    needs_tools("curl", "jq")
    service = request.getfixturevalue("service")
    run = request.getfixturevalue("runs").result(block)
    result = json.loads((service.workdir / "result.json").read_text())
    assert result[0]["status"] == 1 and result[0]["file"].startswith("/v1/audio?"), result
    assert json.loads(run.stdout) == result
    info = sf.info(str(service.workdir / "song.mp3"))
    assert info.samplerate == 48000 and abs(info.duration - 30) < 0.5


def check_models_cli(block: Block, request) -> None:
    service = request.getfixturevalue("service")
    run = request.getfixturevalue("runs").result(block)
    assert "acestep-v15-turbo" in run.stdout, run.stdout


def check_openai_install(block: Block, request) -> None:
    service = request.getfixturevalue("service")
    run = request.getfixturevalue("runs").result(block)  # openai is in the test extras: "already satisfied"
    assert "openai" in run.stdout


def check_openai(block: Block, request) -> None:
    service = request.getfixturevalue("service")
    run = request.getfixturevalue("runs").result(block)
    assert not re.search(r"warn", run.stderr, re.I), run.stderr  # no PydanticSerializationUnexpectedValue
    task = run.stdout.split()[1]
    assert httpx.post(service.server.base_url + "/query_result", json={"task_id_list": [task]},
                      timeout=10).json()["data"][0]["status"] == 1
    assert "random-weight demo model" in run.stdout  # the content says what made the audio
    assert sf.info(str(service.workdir / "lofi.mp3")).samplerate == 48000


def check_client(block: Block, request) -> None:
    service = request.getfixturevalue("service")
    run = request.getfixturevalue("runs").result(block)
    lines = run.stdout.splitlines()
    updates = [line for line in lines if line.split(" ", 1)[0] in ("queued", "running", "succeeded")]
    assert updates[-1] == "succeeded succeeded 100%", lines
    assert len(updates) == len(set(updates)), f"on_update repeated an unchanged status: {updates}"
    # the server's default batch of 2: seeds 42, 43; no bpm or key asked for and no LM ran: "N/A" -> None
    assert "[(42, None, None), (43, None, None)]" in lines, run.stdout
    paths = ast.literal_eval(lines[-1])  # the printed list of paths
    assert len(paths) == 2 and all(sf.info(str(service.workdir / p)).samplerate == 48000 for p in paths)


def check_cli(block: Block, request) -> None:
    service, runs = request.getfixturevalue("service"), request.getfixturevalue("runs")
    run, task = runs.result(block), runs.task_id
    out = run.stdout.splitlines()
    written = [line for line in out if line.startswith("out/")]  # the server's default batch: 2 files
    assert len(written) == 2 and all(sf.info(str(service.workdir / w)).duration > 29 for w in written), out
    assert "succeeded" in out and f"task {task}: already succeeded" in out, out  # status, then cancel
    assert any("acestep-v15-turbo" in line and "random weights" in line for line in out), out
    # not a terminal: one line per change, "<stage> <percent>%" (which stages a poll catches depends on
    # timing; tests/test_engine_generation.py holds the engine to its stage names)
    progress = [line for line in run.stderr.splitlines() if not line.startswith("task ")]
    assert progress and all(re.fullmatch(r"\S.* \d{1,3}%", line) for line in progress), run.stderr
    assert progress[-1] == "succeeded 100%" and len(progress) == len(set(progress)), run.stderr


def check_adapters_cli(block: Block, request) -> None:
    """A test adapter for the demo model, uploaded as a trainer's folder, listed, and applied to a task."""
    service = request.getfixturevalue("service")
    run = request.getfixturevalue("runs").result(block)
    out = run.stdout.splitlines()
    assert any(line.startswith("stored my-style  (lora, rank ") for line in out), out
    assert any(line.startswith("my-style  (lora, ") and line.endswith("uploaded; fits: acestep-v15-turbo)")
               for line in out), out
    written = [line for line in out if line.startswith("styled/")]  # the server's default batch: 2 files
    assert len(written) == 2 and all(sf.info(str(service.workdir / w)).duration > 9 for w in written), out
    task_id = Path(written[0]).name.rsplit("_", 1)[0]
    entry = httpx.post(service.server.base_url + "/query_result", json={"task_id_list": [task_id]},
                       timeout=10).json()["data"][0]
    detail = json.loads(entry["result"])[0]["generation_info_detail"]
    assert [(a["name"], a["scale"]) for a in detail.get("adapters", [])] == [("my-style", 0.8)], detail


def not_a_command(block: Block, request) -> None:
    """The package layout: a directory listing, nothing to run."""
    assert not re.search(r"^\s*(\$|make|pip|python|curl)\b", block.text, re.M), block.text


# first line of the block (a prefix) -> how it is checked
SNIPPETS: dict[str, Callable[[Block, object], None]] = {
    "make run": check_make_commands,
    "TASK=$(curl": check_curl,
    ".venv/bin/acestep-models list": check_models_cli,
    ".venv/bin/pip install openai": check_openai_install,
    "import base64": check_openai,
    "from acestep_client import ACEStepClient": check_client,
    "source .venv/bin/activate": check_cli,
    ".venv/bin/acestep-models make-tiny-adapter": check_adapters_cli,
    "entrypoints/": not_a_command,
}


# blocks run by Runs (the others are checked without running them), and those that install (run first)
RUNS = {check_curl, check_models_cli, check_openai_install, check_openai, check_client, check_cli, check_adapters_cli}
INSTALLS = {check_openai_install}


def classify(block: Block) -> Optional[Callable[[Block, object], None]]:
    return next((check for prefix, check in SNIPPETS.items() if block.first_line.startswith(prefix)), None)


def test_every_block_is_classified():
    unknown = [f"block {b.index}: {b.first_line!r}" for b in readme_blocks() if classify(b) is None]
    assert not unknown, f"README.md blocks this test does not run or set aside (add them to SNIPPETS): {unknown}"
    assert len({classify(b) for b in readme_blocks()}) == len(SNIPPETS), "a SNIPPETS entry matches no block"


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: f"{b.index}:{b.first_line[:40]}")
def test_readme_block_runs_as_written(block, request):
    check = classify(block)
    if check is None:
        pytest.fail(f"unclassified README block {block.index}: {block.first_line!r}")
    check(block, request)

"""The demo never occupies a real model's place: a start without the hub serves a random-weight demo from
<checkpoint dir>/.demo/, the next start with the hub back serves it at once while the real weights download in
the background, and the start after that serves the real model. `acestep-models` (run as the console script)
replaces a demo, lists every model, and ends failures with one line.

The hub is tests/fake_hub.py: a local HTTP server that huggingface_hub itself talks to (HF_ENDPOINT), serving a
tiny checkpoint the code builds in the published (original) layout, without the demo marker: it stands for the
published weights here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.weights.checkpoints import DEMO_MARKER, build_tiny_checkpoint, is_complete
from engine.weights.model_sources import DOWNLOADING, MAIN_REPO
from tests.fake_hub import fake_hub, go_online, original_layout_repo, url_when_down

TURBO = "acestep-v15-turbo"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    return {MAIN_REPO: original_layout_repo(tmp_path_factory.mktemp("hub"), TURBO)}


def test_a_failed_first_download_serves_a_demo_then_the_real_model_once_the_hub_is_back(tmp_path, published,
                                                                                          monkeypatch):
    from engine.weights import demo_models
    from entrypoints.bootstrap import load_engine
    from service.config import Settings

    ck = tmp_path / "ck"
    settings = Settings(checkpoint_dir=str(ck), init_llm="false")
    # 1. no network: the first start's download fails, a demo is built beside the real folder and served
    go_online(monkeypatch, url_when_down())
    first = load_engine(settings).models()[0]
    assert first.random_weights and first.path == str(ck / ".demo" / TURBO)
    assert not is_complete(ck / TURBO) and not (ck / TURBO / "config.json").exists()

    # 2. the hub is back: the start serves the demo at once and fetches the real weights in the background
    with fake_hub(published) as hub:
        go_online(monkeypatch, hub.url)
        second = load_engine(settings).models()[0]
        assert second.random_weights  # meanwhile
        assert demo_models.STARTED[-1].join(120) == {TURBO: "ready"}
    assert (ck / TURBO / "acestep-source.json").is_file() and not (ck / TURBO / DOWNLOADING).exists()
    assert is_complete(ck / ".diffusers" / TURBO)  # converted in the background: the next start loads at once

    # 3. the next start serves the real model, with no network needed
    go_online(monkeypatch, url_when_down())
    started = len(demo_models.STARTED)
    third = load_engine(settings).models()[0]
    assert not third.random_weights and third.path == str(ck / ".diffusers" / TURBO)
    assert len(demo_models.STARTED) == started  # nothing left to download


def test_an_interrupted_download_is_not_taken_for_a_model(tmp_path, monkeypatch):
    """A folder a download began (marker present) is incomplete, whatever files it already holds: the start
    serves a demo instead of failing on it, and the download resumes later."""
    from engine.weights.demo_models import plan_start
    from engine.weights.checkpoints import resolve_model
    from engine.config import EngineConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dit = build_tiny_checkpoint(tmp_path / TURBO, layout="original")
    (dit / DEMO_MARKER).unlink()
    (dit / DOWNLOADING).write_text("ACE-Step/Ace-Step1.5 @ 0123\n")
    config = EngineConfig(checkpoint_dir=str(tmp_path), model_names=[TURBO])
    assert plan_start(config).demo == [TURBO]
    assert resolve_model(config, TURBO) == tmp_path / ".demo" / TURBO


# ------------------------------------------------------------------ the console scripts, as a user runs them
def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ACESTEP_DEBUG")}
    environment.update(env)
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


def test_download_replaces_a_demo_and_list_says_so(tmp_path, published):
    ck = tmp_path / "ck"
    build_tiny_checkpoint(ck / TURBO)  # what `make-tiny` (or an older version of the service) left there
    before = run_cli(["acestep-models", "list", "--checkpoint-dir", str(ck)], tmp_path)
    assert before.returncode == 0 and "DEMO" in before.stdout.split("acestep-5Hz-lm")[0]
    assert "acestep-5Hz-lm-1.7B  (LM" in before.stdout  # the LM is listed too, with its source
    assert f"{MAIN_REPO}/acestep-5Hz-lm-1.7B @ main" in before.stdout

    with fake_hub(published) as hub:
        got = run_cli(["acestep-models", "download", TURBO, "--checkpoint-dir", str(ck)], tmp_path,
                      HF_ENDPOINT=hub.url)
    assert got.returncode == 0, got.stderr
    assert f"now in {ck / '.demo' / TURBO}" in got.stdout
    assert not (ck / TURBO / DEMO_MARKER).exists() and not (ck / TURBO / "model_index.json").exists()
    after = run_cli(["acestep-models", "list", "--checkpoint-dir", str(ck)], tmp_path)
    dit = after.stdout.split("acestep-5Hz-lm")[0]
    assert f"present at {ck / TURBO}, original layout (converted on first load" in dit
    assert f"downloaded from {MAIN_REPO} @ {hub.commit[:12]}" in dit and "DEMO" not in dit


def test_an_offline_download_ends_with_one_line(tmp_path):
    got = run_cli(["acestep-models", "download", TURBO, "--checkpoint-dir", str(tmp_path / "ck")], tmp_path,
                  HF_ENDPOINT=url_when_down())
    assert got.returncode == 1 and got.stdout == ""
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, got.stderr
    assert lines[0].startswith(f"acestep-models: error: cannot download {TURBO} from {MAIN_REPO} @ main: "
                               "could not reach http://127.0.0.1:")
    assert f"acestep-models download {TURBO}` again" in lines[0]  # the fix
    debug = run_cli(["acestep-models", "--debug", "download", TURBO, "--checkpoint-dir", str(tmp_path / "ck")],
                    tmp_path, HF_ENDPOINT=url_when_down())
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConnectError" in debug.stderr


@pytest.mark.parametrize("command", [["acestep-api"], ["acestep-worker"], ["acestep-models", "list"]])
def test_a_bad_setting_ends_with_one_line_naming_it(tmp_path, command):
    (tmp_path / ".env").write_text("ACESTEP_API_PORT=eighty\n")
    got = run_cli(command, tmp_path)
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(lines) == 1, got.stderr
    assert lines[0].startswith(f"{command[0]}: error: invalid settings: ACESTEP_API_PORT")
    assert "'eighty'" in lines[0] and ".env" in lines[0]
    debug = run_cli(command, tmp_path, ACESTEP_DEBUG="1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_the_demo_lm_is_built_beside_the_real_lm_folder(tmp_path, monkeypatch):
    from entrypoints.bootstrap import choose_lm
    from engine.lm.tiny import is_random_lm
    from service.config import Settings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(checkpoint_dir=str(tmp_path), init_llm="auto")
    chosen = choose_lm(settings, demo_dits=[TURBO])
    assert chosen == str(tmp_path / ".demo" / "acestep-5Hz-lm-1.7B") and is_random_lm(chosen)
    assert not (tmp_path / "acestep-5Hz-lm-1.7B").exists()  # the real LM's folder stays free
    assert choose_lm(settings, demo_dits=[]) is None  # real DiTs never get the random LM


def test_the_demo_lm_answers_with_small_token_caps_and_says_so(tmp_path):
    """A random-weight LM never writes a stop token: each phase runs to its cap. The demo's caps keep a sample
    (the longest path) to a couple of hundred tokens instead of ~3,000, and the result says why."""
    from engine.config import EngineConfig
    from engine.lm.folders import ensure_demo_lm
    from engine.lm_bridge import DEMO_LM_BUDGETS, DEMO_LM_NOTE, load_planner
    from engine.request import GenerationRequest

    folder = ensure_demo_lm(tmp_path, "acestep-5Hz-lm-1.7B", audio_codes=16)
    planner = load_planner(EngineConfig(checkpoint_dir=str(tmp_path), lm_model=folder.name), "cpu")
    plan = planner.plan(GenerationRequest(sample_query="a calm lofi track", batch_size=1), seeds=[1])
    (sample,) = plan.phases
    cap = DEMO_LM_BUDGETS["max_cot_tokens"] + DEMO_LM_BUDGETS["max_lyrics_tokens"] + 2
    assert sample.phase == "sample" and sum(sample.generated_tokens) <= cap
    assert {"bpm", "duration", "keyscale"} <= set(plan.metadata)  # the capped block still parses
    assert DEMO_LM_NOTE in plan.notes and plan.random_weights

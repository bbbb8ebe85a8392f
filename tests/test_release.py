"""Release basics: the licence, the changelog, one version everywhere (package metadata, /health,
/v1/stats, the OpenAPI document, the client's User-Agent), and JSON log fields a log pipeline can
index (no ANSI colour copies, one type per field)."""
from __future__ import annotations

import io
import json
import logging
import re
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
import pytest

import acestep_client
from acestep_client import ACEStepClient
from service.observability.logs import configure_logging
from service.version import __version__
from tests.api_support import make_api

ROOT = Path(__file__).resolve().parents[1]


def test_apache_licence_for_server_and_client_and_the_weights_licence_is_named():
    for folder in (ROOT, ROOT / "client"):
        text = (folder / "LICENSE").read_text()
        assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"], folder
        assert tomllib.loads((folder / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    readme = (ROOT / "README.md").read_text()
    licence = readme.split("## Licence", 1)[1]
    assert "Apache-2.0" in licence and "model weights" in licence and "model card" in licence


def test_the_changelog_has_an_entry_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(__version__)}\]", changelog, re.M), __version__
    assert re.search(r"^## \[Unreleased\]", changelog, re.M)


def test_one_version_from_the_package_metadata_everywhere(settings):
    assert metadata.version("acestep-serve") == __version__
    assert metadata.version("acestep-client") == acestep_client.__version__
    api = make_api(settings)
    health = api.client.get("/health").json()["data"]
    stats = api.client.get("/v1/stats").json()["data"]
    assert health["version"] == stats["version"] == api.client.get("/openapi.json").json()["info"]["version"] \
        == __version__


def test_the_client_names_itself_in_its_user_agent():
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["user-agent"])
        return httpx.Response(200, json={"data": {"models": [], "default_model": None}})

    with ACEStepClient("http://server", http=httpx.Client(transport=httpx.MockTransport(answer))) as client:
        client.models()
    own = httpx.Client(transport=httpx.MockTransport(answer), headers={"User-Agent": "my-app/2"})
    with ACEStepClient("http://server", http=own) as client:
        client.models()
    assert seen == [f"acestep-client/{acestep_client.__version__} python-httpx/{httpx.__version__}", "my-app/2"]


@pytest.fixture
def json_log():
    """The service's JSON log configuration, written to a buffer; the previous handlers restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("INFO", "json", stream=buffer)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_json_lines_carry_no_ansi_colour_copy(json_log):
    # what uvicorn logs at start-up: the message, plus a coloured copy for its own console formatter
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42,
                                            extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
    [line] = json_log()
    assert line["message"] == "Started server process [42]" and "color_message" not in line
    assert not any("\x1b" in str(v) for v in line.values())


def test_task_fields_keep_one_type_on_every_line_also_for_a_batch(settings, json_log):
    api = make_api(settings)
    ids = [api.submit(prompt="same batch", audio_duration=10, batch_size=1, seed=s) for s in (1, 2)]
    api.run_worker()
    lines = json_log()
    about = [line for line in lines if "attempt" in line or "attempts" in line]
    assert any("attempts" in line for line in about), "no line about the two-task batch"
    for line in about:
        if "attempt" in line:
            assert isinstance(line["attempt"], int) and line["task_id"] in ids, line
        if "attempts" in line:
            assert line["task_ids"] == ids and line["attempts"] == [1, 1], line
    assert {line["task_id"] for line in about if "task_id" in line} == set(ids)

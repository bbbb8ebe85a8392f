"""Shared fixtures. Every test is offline: no model hub, no real AWS."""
from __future__ import annotations

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never reach real AWS from a test, whatever the developer's shell has.
for _k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_k, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

import pytest  # noqa: E402

# tests/vllm run in the vLLM venv (`make test-vllm`); in a venv without vLLM they are not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]

from service.config import Settings  # noqa: E402

BACKENDS = ["embedded", "aws"]


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "checkpoints"),
                    visibility_timeout=30.0)


def open_backend(kind: str, settings: Settings, tmp_path):
    """Context manager yielding a Backend of the given kind (AWS through moto)."""
    if kind == "embedded":
        from contextlib import nullcontext

        from service.embedded import make_embedded_backend

        return nullcontext(make_embedded_backend(settings))
    from tests.aws_support import aws_backend

    overrides = {f: getattr(settings, f) for f in ("visibility_timeout", "max_receives", "queue_maxsize")}
    return aws_backend(tmp_path, **overrides)


@pytest.fixture(params=BACKENDS)
def backend(request, settings, tmp_path):
    with open_backend(request.param, settings, tmp_path) as b:
        yield b



# Live demo servers for the client, CLI and Studio tests (tests/demo_servers.py), started once per
# session and only when a test asks.
@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-servers")


@pytest.fixture(scope="session")
def keyed_server(demo_root):
    """The service with ACESTEP_API_KEY = tests.demo_servers.API_KEY."""
    from tests.demo_servers import start_demo_server

    with start_demo_server(demo_root, keyed=True) as server:
        yield server


@pytest.fixture(scope="session")
def open_server(demo_root, keyed_server):
    """The service without an API key (its tasks run on keyed_server's worker)."""
    from tests.demo_servers import start_demo_server

    with start_demo_server(demo_root, keyed=False) as server:
        yield server


def pytest_collection_modifyitems(config, items):
    """`soak` tests run only when asked for with `-m soak` (never in `make test`)."""
    if "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)

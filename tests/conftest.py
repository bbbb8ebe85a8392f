"""Shared fixtures. Every test is offline: no model hub, no real AWS."""
from __future__ import annotations

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No hub mirror or per-model source override from the developer's shell: the hub stand-ins serve the published
# repos, and a test that needs HF_ENDPOINT sets it itself (tests/fake_hub.py go_online).
for _k in [k for k in os.environ if k == "HF_ENDPOINT" or k.startswith(("ACESTEP_HF_REPO_", "ACESTEP_HF_REVISION_"))]:
    os.environ.pop(_k)
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


# Every test is one kind (markers in pyproject.toml), by module unless a test says otherwise: `e2e`
# starts servers or slow tools (the service, moto's server, the Lambda probe, CDK synth, chromium, pip,
# docker's build context); `integration` runs a real engine or LM on tiny checkpoints, or AWS through
# moto in-process; `unit` is the rest, in one process, and `make test-fast` runs those.
E2E_MODULES = {
    "test_aws_e2e", "test_client_live", "test_client_package", "test_compose", "test_demo_recovery",
    "test_dockerfile", "test_e2e_broken_worker", "test_e2e_original_layout", "test_e2e_service",
    "test_heap_settle", "test_infra", "test_infra_readme", "test_install_torch", "test_lambda_snapstart",
    "test_lock", "test_package_lambda", "test_readme_snippets", "test_release", "test_slowloris", "test_soak",
    "test_studio_browser", "test_worker_healthcheck", "test_api_lm", "test_api_routes", "test_webhooks",
    "test_aws_blobs", "test_fault_leases", "test_worker_pipeline", "test_lambda_handler",
}
INTEGRATION_PREFIXES = ("test_engine_", "test_lm_", "test_aws_")  # the engine, the LM, AWS's adapters
INTEGRATION_MODULES = {"test_original_layout", "test_api_aws", "test_fault_signing", "test_openapi_conformance"}
UNIT_MODULES = {"test_engine_plan", "test_lm_text"}  # torch-free: the engine's plan, the LM's text handling
LIVE_FIXTURES = {"keyed_server", "open_server"}
KINDS = ("unit", "integration", "e2e")


def _kind(item) -> str:
    marked = [m.name for m in item.iter_markers() if m.name in KINDS]
    if marked:
        return marked[0]
    module, fixtures = item.path.stem, set(getattr(item, "fixturenames", ()))
    if module in E2E_MODULES or LIVE_FIXTURES & fixtures:
        return "e2e"
    if module in UNIT_MODULES:
        return "unit"
    params = getattr(getattr(item, "callspec", None), "params", {})
    on_moto = "aws" in params.values() or any("aws" in f for f in fixtures)  # `backend` on aws, `bloated_aws_api`
    if module.startswith(INTEGRATION_PREFIXES) or module in INTEGRATION_MODULES or on_moto:
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config, items):
    """Marks each test with its kind; `soak` tests run only when asked for with `-m soak` (never in `make test`)."""
    for item in items:
        kind = _kind(item)
        if not item.get_closest_marker(kind):
            item.add_marker(kind)
    if "soak" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)

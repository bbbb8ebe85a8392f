"""docker-compose.yml: valid Compose (`docker compose config` where the plugin is installed, it needs no engine;
the Compose Specification's JSON schema always), and wired the way the service works: the API and the workers
share the embedded backend's data volume, the workers get the GPU, the weights volume and the download, and
both run the images' health checks."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.docker_support import parse_dockerfile, stage_instructions, stages

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict) -> dict:
    return {k: str(v) for k, v in service["environment"].items()}


def mounts(service: dict) -> dict[str, str]:
    """container path -> volume"""
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service["volumes"]}


def test_valid_against_the_compose_specification():
    validator = jsonschema.Draft7Validator(json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text()))
    validator.validate(compose())
    broken = compose()  # the schema check can fail: a misspelt key, a list given as a string
    broken["services"]["api"]["enviroment"] = broken["services"]["api"].pop("environment")
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert len(list(validator.iter_errors(broken))) == 2


def _compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


def test_docker_compose_config_accepts_it():
    if not _compose_cli():
        pytest.skip("the `docker compose` plugin is not installed (the schema check above ran instead)")
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["services"]["worker"]["deploy"]["replicas"] == 1


def test_services_build_targets_that_exist():
    targets = set(stages(parse_dockerfile(ROOT / "Dockerfile")))
    services = compose()["services"]
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    assert {s["build"]["target"] for s in services.values()} <= targets
    assert all(s["build"]["context"] == "." for s in services.values())


def test_api_and_workers_share_the_embedded_backend():
    services = compose()["services"]
    api, worker = services["api"], services["worker"]
    api_env, worker_env = environment(api), environment(worker)
    for env in (api_env, worker_env):
        assert env["ACESTEP_BACKEND"] == "embedded"
    data = api_env["ACESTEP_DATA_DIR"]
    assert data == worker_env["ACESTEP_DATA_DIR"] and mounts(api)[data] == mounts(worker)[data]
    assert api_env["ACESTEP_QUEUE_WORKERS"] == "0"  # the API image has no torch: its workers are the worker service
    assert api_env["ACESTEP_API_HOST"] == "0.0.0.0"  # reachable through the published port
    assert "--backend" in worker["command"] and worker["command"][worker["command"].index("--backend") + 1] == "embedded"
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"


def test_workers_get_the_gpu_the_weights_and_the_first_start_download():
    worker = compose()["services"]["worker"]
    env = environment(worker)
    assert mounts(worker)[env["ACESTEP_CHECKPOINT_DIR"]] in compose()["volumes"]
    assert env["ACESTEP_ALLOW_DOWNLOAD"] == "true" and env["ACESTEP_DEVICE"] == "cuda"
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert re.fullmatch(r"\$\{ACESTEP_WORKERS:-\d+\}", str(worker["deploy"]["replicas"]))


def test_workers_write_the_heartbeat_their_image_checks():
    worker = compose()["services"]["worker"]
    check = {i["instruction"]: i["value"] for i in stage_instructions(parse_dockerfile(ROOT / "Dockerfile"), "worker")}
    checked_file = json.loads(check["HEALTHCHECK"].split("CMD", 1)[1])[-1]
    command = worker["command"]
    assert command[command.index("--heartbeat-file") + 1] == checked_file
    for service in compose()["services"].values():
        assert service.get("healthcheck", {}).get("disable") is not True


def test_every_setting_named_is_one_the_service_reads():
    known = (ROOT / "service" / "config.py").read_text()
    for service in compose()["services"].values():
        for name in service["environment"]:
            assert f'"{name}"' in known, f"{name} is not a setting of service/config.py"

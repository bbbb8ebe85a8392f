"""infra/README.md's commands are tests: each one in its ```bash blocks runs as written, or as a named stand-in.

A newcomer's state: the repository root, a shell with no venv activated, no AWS credentials, no AWS config
(`env -i` with PATH and a fresh HOME only). Each block is one bash script (`set -e`; a `cd` carries to the
block's later lines, as it would in a terminal). A command that needs a real AWS account runs as the stand-in
listed in HANDLING with its reason: a deploy as the synth of the same app with the same `-c` flags (what
deploy would upload, cdk-nag included), a bootstrap as its template; a step the CLI cannot stand in for names
the test that does the same against moto. A command that is neither in HANDLING nor run fails the test, and so
does a HANDLING entry that the README no longer has.

Cost: `make infra-deps` (an up-to-date check in CI, where `make test` installed both), two Lambda zips (pip from
PyPI) and two `cdk synth` runs: about 45 s on a quiet 2-core machine, a minute loaded.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "infra" / "README.md"
STACK = "AceStep"  # the app's default stack name
# What a placeholder stands for where a stand-in must run: an example value of the operator's own.
EXAMPLES = {"<account>": "123456789012", "<region>": "us-east-1"}
# Placeholders the operator fills in from elsewhere than the stack's outputs.
OTHER_PLACEHOLDERS = {"<account>", "<region>", "<task_id>"}


@dataclass(frozen=True)
class StandIn:
    """What runs instead of a command that needs an AWS account (None: nothing can), and why."""
    command: Optional[str]
    reason: str
    covered_by: str = ""  # tests/<file>.py::<test> doing the same step against moto or a Docker engine


RUN = "run as written"
DEPLOY = "needs an account: synthesizes the same app with the same context instead, which is what deploy uploads " \
         "(cdk-nag included; a finding stops it)"


def deploy_as_synth(command: str) -> str:
    """`npx cdk deploy ...` as `npx cdk synth --quiet ...` with the same -c flags, placeholders filled in."""
    synth = command.replace("npx cdk deploy", "npx cdk synth --quiet").replace(" --outputs-file outputs.json", "")
    for placeholder, value in EXAMPLES.items():
        synth = synth.replace(placeholder, value)
    return synth


E2E = "tests/test_aws_e2e.py::test_a_task_runs_once_and_downloads_through_a_presigned_redirect"
HANDLING: dict[str, object] = {
    "make infra-deps": RUN,
    "make synth": RUN,
    "cd infra": RUN,
    "npx cdk bootstrap": StandIn("npx cdk bootstrap --show-template > /dev/null",
                                 "needs an account: the CLI prints the bootstrap template it would deploy"),
    # its synth (`npx cdk synth --quiet` in infra/, no -c flags) is exactly what `make synth` ran above
    "npx cdk deploy --outputs-file outputs.json": StandIn(None, DEPLOY + "; that synth is `make synth`'s, run above"),
    ".venv/bin/acestep-models publish acestep-v15-turbo --bucket <BucketName>": StandIn(
        ".venv/bin/acestep-models publish --help | grep -q -- --bucket",
        "needs the stack's bucket: the command and its flag exist here; publishing into S3 runs against moto",
        covered_by="tests/test_aws_model_mirror.py::test_models_cli_publishes_the_converted_layout"),
    "KEY=$(aws secretsmanager get-secret-value --secret-id <ApiKeySecretArn> --query SecretString --output text)":
        StandIn(None, "needs the account's secret; the API reading its key from Secrets Manager runs against moto",
                covered_by=E2E),
    "curl -s -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' "
    "-d '{\"prompt\":\"lofi hip hop\",\"audio_duration\":30}' <ApiUrl>/release_task":
        StandIn(None, "needs the deployed API; the same request over HTTP runs against moto", covered_by=E2E),
    "curl -s -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' "
    "-d '{\"task_id_list\":[\"<task_id>\"]}' <ApiUrl>/query_result":
        StandIn(None, "needs the deployed API; the same polling over HTTP runs against moto", covered_by=E2E),
    "docker build --target worker -t <account>.dkr.ecr.<region>.amazonaws.com/acestep-worker:v1 .":
        StandIn(None, "needs a Docker engine (none here); the image builds for real where one exists",
                covered_by="tests/test_dockerfile.py::test_image_builds"),
    "docker push <account>.dkr.ecr.<region>.amazonaws.com/acestep-worker:v1":
        StandIn(None, "needs the account's registry; that the task may pull from it is checked in the template",
                covered_by="tests/test_infra.py::test_private_ecr_worker_image_is_pullable_by_the_task"),
    ".venv/bin/python infra/package_lambda.py build/lambda": RUN,
    "cd infra && npx cdk deploy -c worker_image=<account>.dkr.ecr.<region>.amazonaws.com/acestep-worker:v1 "
    "-c lambda_asset_dir=../build/lambda": StandIn(deploy_as_synth(
        "cd infra && npx cdk deploy -c worker_image=<account>.dkr.ecr.<region>.amazonaws.com/acestep-worker:v1 "
        "-c lambda_asset_dir=../build/lambda"), DEPLOY),
    "cd infra && npx cdk destroy --force": StandIn(
        "cd infra && npx cdk list --app cdk.out | grep -qx " + STACK,
        "needs an account: lists the stack destroy would delete, from the assembly synthesized above"),
    "aws s3 rm s3://<BucketName> --recursive && aws s3 rb s3://<BucketName>":
        StandIn(None, "needs the account's bucket; its name is a stack output (checked below)"),
    "aws dynamodb delete-table --table-name <TableName>":
        StandIn(None, "needs the account's table; its name is a stack output (checked below)"),
}


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comments and blank lines dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines = re.sub(r"\\\n\s*", "", body).splitlines()
        blocks.append([re.sub(r"\s+#\s.*$", "", line).strip() for line in lines
                       if line.strip() and not line.strip().startswith("#")])
    return blocks


# The machine's network settings (proxy, CA bundle, package index) are the machine's, not the shell's state:
# they pass through. Nothing named AWS_* does, whatever it holds.
MACHINE_NETWORK = re.compile(r"^(?!AWS_)(.*_CA_.*|.*CA_BUNDLE|.*CA_CERTS?(_FILE)?|SSL_CERT_\w+|PIP_\w+|"
                             r"npm_config_\w+|NPM_CONFIG_\w+|(HTTPS?|NO|ALL)_PROXY|(https?|no|all)_proxy)$")


def newcomer_env(home: Path) -> dict[str, str]:
    """No venv, no AWS credentials or config: PATH (with wherever node lives), a fresh HOME, the network settings."""
    path = ["/usr/local/bin", "/usr/bin", "/bin"]
    npm = shutil.which("npm")
    if npm and str(Path(npm).parent) not in path:
        path.insert(0, str(Path(npm).parent))
    network = {k: v for k, v in os.environ.items() if MACHINE_NETWORK.match(k)}
    return {**network, "PATH": ":".join(path), "HOME": str(home), "LANG": "C.UTF-8"}


def script_for(block: list[str]) -> list[str]:
    lines = []
    for command in block:
        handling = HANDLING[command]
        if handling == RUN:
            lines.append(command)
        elif isinstance(handling, StandIn) and handling.command:
            lines.append(handling.command)
    return lines


def test_every_command_is_run_or_has_a_reasoned_stand_in():
    commands = [c for block in bash_blocks(README.read_text()) for c in block]
    assert commands, "no ```bash blocks found in infra/README.md"
    unknown = [c for c in commands if c not in HANDLING]
    assert not unknown, ("infra/README.md has commands this test neither runs nor stands in for; add each to "
                         "HANDLING (RUN, or a StandIn with its reason):\n" + "\n".join(unknown))
    stale = [c for c in HANDLING if c not in commands]
    assert not stale, f"HANDLING lists commands infra/README.md no longer has: {stale}"
    for command, handling in HANDLING.items():
        if isinstance(handling, StandIn):
            assert len(handling.reason.split()) >= 6, command
            assert (handling.command or handling.covered_by or "stack output" in handling.reason
                    or "make synth" in handling.reason), command


@pytest.mark.parametrize("test_id", sorted({h.covered_by for h in HANDLING.values()
                                            if isinstance(h, StandIn) and h.covered_by}))
def test_the_named_stand_in_tests_exist(test_id):
    path, name = test_id.split("::")
    tree = ast.parse((ROOT / path).read_text())
    assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, test_id


def test_the_cdk_app_launcher_names_the_install_when_the_venv_is_missing(tmp_path):
    env = {**newcomer_env(tmp_path), "ACESTEP_VENV": str(tmp_path / "no-venv")}
    run = subprocess.run(["python3", "launch.py"], cwd=ROOT / "infra", env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0 and "make infra-deps" in run.stderr and "no-venv" in run.stderr


@pytest.fixture(scope="module")
def synthesized_by_readme(tmp_path_factory) -> list[dict]:
    """Runs every block of infra/README.md, in order, as the newcomer; the template each block synthesized."""
    if shutil.which("npm") is None:
        pytest.fail("npm is not installed: infra/README.md's prerequisites (Node 18+ with npm) are missing")
    home = tmp_path_factory.mktemp("home")
    env = newcomer_env(home)
    assert not any(k.startswith("AWS_") or k in ("VIRTUAL_ENV", "DOCKER_HOST") for k in env)
    template = ROOT / "infra" / "cdk.out" / f"{STACK}.template.json"
    template.unlink(missing_ok=True)
    templates = []
    for block in bash_blocks(README.read_text()):
        script = script_for(block)
        if not script:
            continue
        run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(script)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (f"infra/README.md block failed:\n{chr(10).join(script)}\n"
                                     f"--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-6000:]}")
        if template.exists():
            templates.append(json.loads(template.read_text()))
            template.unlink()
    return templates


def _worker_image(template: dict) -> str:
    task_def = next(r for r in template["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition")
    return json.dumps(task_def["Properties"]["ContainerDefinitions"][0]["Image"])


@pytest.mark.timeout(600)  # the fixture runs the README: pip for two Lambda zips and two synths, ~1 min loaded
def test_the_readme_synthesizes_the_default_path_and_the_prebuilt_one(synthesized_by_readme):
    """make synth (the default deploy's synth): the worker image built from the Dockerfile (staged at synth, no
    Docker daemon) and the API zip built by the app; then the operator's own image and zip."""
    default, prebuilt = synthesized_by_readme
    assert "container-assets" in _worker_image(default)
    assert "AWS::Lambda::Function" in {r["Type"] for r in default["Resources"].values()}
    assert "123456789012.dkr.ecr.us-east-1." in _worker_image(prebuilt) and "acestep-worker:v1" in _worker_image(prebuilt)


@pytest.mark.timeout(600)
def test_every_placeholder_is_a_stack_output(synthesized_by_readme):
    """<BucketName>, <ApiUrl>...: the operator copies them from the deploy's outputs, so each must be one."""
    placeholders = {p for block in bash_blocks(README.read_text()) for c in block for p in re.findall(r"<\w+>", c)}
    outputs = {f"<{name}>" for name in synthesized_by_readme[0]["Outputs"]}
    assert placeholders - OTHER_PLACEHOLDERS <= outputs, placeholders - OTHER_PLACEHOLDERS - outputs
    assert {"<BucketName>", "<ApiUrl>", "<ApiKeySecretArn>", "<TableName>"} <= placeholders

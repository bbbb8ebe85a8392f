"""The CDK app synthesises offline, passes cdk-nag, and the template has the resources, IAM scoping and scaling we rely on.

One app holds every stack the tests read, synthesized once for the module under cdk-nag (about 10 s on a
quiet machine, mostly jsii start-up and the nag packs; each extra stack adds 1-2 s):
- STACK, every option on (a private ECR worker image, spot, CloudFront/WAF, reserved concurrency), in an account;
- the paths an operator takes: the DEFAULT worker image (the Dockerfile built as an image asset) and a private
  ECR image, each with an account (what real credentials give) and without one (a synth with no credentials,
  the stack environment-agnostic), and a public image, which needs no pull permission.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.package_lambda import LAMBDA_PYTHON

cdk = pytest.importorskip("aws_cdk", reason="aws-cdk-lib is not installed (pip install '.[infra]')")
from aws_cdk.assertions import Match, Template  # noqa: E402

from infra.acestep_stack import (HEARTBEAT_FILE, AceStepStack, StackOptions, parse_ecr_image,  # noqa: E402
                                 workers_for_backlog)
from infra.nag import add_checks  # noqa: E402
from infra import worker_engine  # noqa: E402
from service.aws import schema  # noqa: E402

STACK = "AceStepTest"
ORIGINS = "https://studio.example.com,https://app.example.com"
ECR_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/acestep-worker:test"
OPTIONS = dict(max_workers=5, backlog_per_worker=3, max_receives=4, lease_seconds=240, task_ttl_days=9,
               worker_image=ECR_IMAGE,
               cors_origins=ORIGINS, api_rate_limit=40, api_burst_limit=80, api_reserved_concurrency=25,
               spot_max_price="1.006", cloudfront=True, waf_rate_limit=600,
               quantize="int8", offload="modules", init_llm="true", lm_model_path="acestep-5Hz-lm-0.6B", lm_backend="pt",
               config_path2="acestep-v15-base")
ENGINE_ENV = {"ACESTEP_QUANTIZE": "int8", "ACESTEP_OFFLOAD": "modules", "ACESTEP_INIT_LLM": "true",
              "ACESTEP_LM_MODEL_PATH": "acestep-5Hz-lm-0.6B", "ACESTEP_LM_BACKEND": "pt"}
ACCOUNT = dict(account="123456789012", region="us-east-1")
OTHER_ECR_IMAGE = "210987654321.dkr.ecr.eu-west-1.amazonaws.com/team/acestep-worker@sha256:" + "ab" * 32
# name: (options, environment or None for an environment-agnostic stack)
VARIANTS = {
    STACK: (OPTIONS, ACCOUNT),
    "DefaultImageInAccount": ({}, ACCOUNT),
    "DefaultImageNoAccount": ({}, None),
    "EcrImageInAccount": ({"worker_image": OTHER_ECR_IMAGE}, ACCOUNT),
    "EcrImageNoAccount": ({"worker_image": OTHER_ECR_IMAGE}, None),
    "PublicImage": ({"worker_image": "public.ecr.aws/acme/acestep-worker:1"}, ACCOUNT),
}


def synth_with_nag(app: "cdk.App", out) -> dict:
    """Synthesize `app` under both cdk-nag packs; their report (a finding also stops the synth)."""
    add_checks(app)
    try:
        app.synth()
    except Exception as exc:
        if "ValidationFailed" not in str(exc) and "Validation failed" not in str(exc):
            raise
    return json.loads((out / "policy-validation-report.json").read_text())


def _findings(report: dict) -> list[str]:
    return [f"{v['ruleName']} at {r['constructPath']}: {v['description']}"
            for plugin in report["pluginReports"] for v in plugin["violations"] for r in v["violatingResources"]]


@dataclass
class Synth:
    out: Path
    report: dict
    templates: dict  # stack name -> Template
    acknowledged: dict  # stack name -> {construct path: [acknowledged rules]}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Synth:
    asset = tmp_path_factory.mktemp("lambda_pkg")
    (asset / "placeholder.txt").write_text("built by infra/README.md's package step\n")
    out = tmp_path_factory.mktemp("cdk_out")
    app = cdk.App(outdir=str(out), context={"@aws-cdk/core:validationReportJson": True})
    stacks = {name: AceStepStack(app, name, StackOptions(lambda_asset_dir=str(asset), **options),
                                 env=cdk.Environment(**env) if env else None)
              for name, (options, env) in VARIANTS.items()}
    report = synth_with_nag(app, out)
    acknowledged = {name: {c.node.path: acks for c in stack.node.find_all()
                           if (acks := [m.data for m in c.node.metadata
                                        if m.type == cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY])}
                    for name, stack in stacks.items()}
    templates = {name: Template.from_json(json.loads((out / f"{name}.template.json").read_text())) for name in stacks}
    return Synth(out, report, templates, acknowledged)


@pytest.fixture(scope="module")
def synthesized(synth) -> tuple[Template, dict, dict]:
    """(template, cdk-nag report, acknowledged rules by construct path) of the all-options stack."""
    return synth.templates[STACK], synth.report, synth.acknowledged[STACK]


@pytest.fixture(scope="module")
def template(synthesized) -> Template:
    return synthesized[0]


def _resources(template, kind):
    return template.find_resources(kind)


def _one(template, kind):
    found = _resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return next(iter(found.values()))["Properties"]


def _logical_id(template, kind, predicate=lambda props: True):
    ids = [k for k, v in _resources(template, kind).items() if predicate(v.get("Properties", {}))]
    assert len(ids) == 1, ids
    return ids[0]


# The logical ids of what holds data or is handed out: CloudFormation replaces a resource whose logical id
# changes, so a new id on a deployed stack is a new, empty table or bucket, new queues (tasks in flight lost)
# or new secrets (every client's key invalid). These are the ids deployed stacks have; a refactor keeps them.
STATEFUL_LOGICAL_IDS = {
    "Tasks0BA6A452": "AWS::DynamoDB::Table",
    "Audio9AB18887": "AWS::S3::Bucket",
    "AccessLogs8B620ECA": "AWS::S3::Bucket",
    "TasksQueueDA0BFEF7": "AWS::SQS::Queue",
    "InteractiveQueue642CCD4D": "AWS::SQS::Queue",
    "TasksDlqDCE5596F": "AWS::SQS::Queue",
    "ApiKeyF9DDEE66": "AWS::SecretsManager::Secret",
    "UrlSigningSecret661391A9": "AWS::SecretsManager::Secret",
    "WebhookSigningSecretDD964680": "AWS::SecretsManager::Secret",
}


def test_stateful_resources_keep_their_logical_ids(synth):
    """Every deployable path: the table, buckets, queues and secrets under the ids deployed stacks hold (the
    stack's sections stay out of logical ids, infra/sections/logical_ids.py), and no other of their kind."""
    for name, template in synth.templates.items():
        resources = template.to_json()["Resources"]
        found = {rid: r["Type"] for rid, r in resources.items() if r["Type"] in set(STATEFUL_LOGICAL_IDS.values())}
        assert found == STATEFUL_LOGICAL_IDS, name


def test_table_matches_the_adapter_schema(template):
    table = _one(template, "AWS::DynamoDB::Table")
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": schema.TTL_ATTR, "Enabled": True}
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["KeySchema"] == [{"AttributeName": schema.PK, "KeyType": "HASH"}]
    indexes = {i["IndexName"]: i for i in table["GlobalSecondaryIndexes"]}
    assert [k["AttributeName"] for k in indexes[schema.QUEUED_INDEX]["KeySchema"]] == [schema.QUEUED_PART, schema.QUEUED_SORT]
    assert [k["AttributeName"] for k in indexes[schema.FINISHED_INDEX]["KeySchema"]] == [schema.FINISHED_PART, schema.FINISHED_SORT]
    assert indexes[schema.FINISHED_INDEX]["Projection"]["NonKeyAttributes"] == [schema.DURATION_ATTR]
    assert [k["AttributeName"] for k in indexes[schema.UNSENT_INDEX]["KeySchema"]] == [schema.UNSENT_PART, schema.UNSENT_SINCE]


def test_queue_redrives_to_the_dlq_and_outlives_the_lease(template):
    dlq_id = _logical_id(template, "AWS::SQS::Queue", lambda p: "RedrivePolicy" not in p)
    queues = {k: v["Properties"] for k, v in _resources(template, "AWS::SQS::Queue").items() if k != dlq_id}
    assert sorted(k.rstrip("0123456789ABCDEF") for k in queues) == ["InteractiveQueue", "TasksQueue"]
    for queue in queues.values():  # both lanes: the same lease and redrive, into the one DLQ
        assert queue["RedrivePolicy"] == {"deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]}, "maxReceiveCount": 4}
        assert queue["VisibilityTimeout"] > OPTIONS["lease_seconds"]
    main = next(v for k, v in queues.items() if k.startswith("TasksQueue"))
    assert main["ReceiveMessageWaitTimeSeconds"] == 20


def test_the_interactive_lane_is_sent_to_by_the_api_and_read_by_workers_only(template):
    lane = _logical_id(template, "AWS::SQS::Queue", lambda p: "RedrivePolicy" in p and "ReceiveMessageWaitTimeSeconds" not in p)
    arn = {"Fn::GetAtt": [lane, "Arn"]}

    def lane_actions(prefix):
        statements = _role_statements(template, lambda k, p: k.startswith(prefix))
        return {a for st in statements if arn in _as_list(st["Resource"]) for a in _as_list(st["Action"])}

    assert lane_actions("ApiFunction") == {"sqs:SendMessage"}
    # send: a give-back (shutdown) or a dead letter that never ran goes back to the lane, as on the main queue
    assert lane_actions("WorkerTaskTaskRole") == {"sqs:ReceiveMessage", "sqs:DeleteMessage",
                                                  "sqs:ChangeMessageVisibility", "sqs:SendMessage"}
    function = _resources(template, "AWS::Lambda::Function")[_logical_id(
        template, "AWS::Lambda::Function", lambda p: p.get("Handler") == "entrypoints.lambda_api.handler")
    ]["Properties"]["Environment"]["Variables"]
    (task_def,) = _resources(template, "AWS::ECS::TaskDefinition").values()
    worker = {e["Name"]: e["Value"] for c in task_def["Properties"]["ContainerDefinitions"] for e in c.get("Environment", [])}
    assert function["ACESTEP_INTERACTIVE_QUEUE_URL"] == worker["ACESTEP_INTERACTIVE_QUEUE_URL"] == {"Ref": lane}
    template.has_resource_properties("AWS::CloudWatch::Alarm", {
        "MetricName": "ApproximateAgeOfOldestMessage",
        "Dimensions": [{"Name": "QueueName", "Value": {"Fn::GetAtt": [lane, "QueueName"]}}]})


def test_buckets_are_private_encrypted_and_expire_task_files(template):
    for bucket in (b["Properties"] for b in _resources(template, "AWS::S3::Bucket").values()):  # audio, access logs
        assert bucket["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
        assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"][
            "SSEAlgorithm"] == "AES256"
    bucket = _resources(template, "AWS::S3::Bucket")[
        _logical_id(template, "AWS::S3::Bucket", lambda p: "LoggingConfiguration" in p)]["Properties"]
    expiring = {r.get("Prefix"): r.get("ExpirationInDays") for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert expiring["outputs/"] == 9 and expiring["uploads/"] == 9


def _role_statements(template, role_predicate):
    """Statements of the inline policies attached to the role(s) picked by `role_predicate`."""
    roles = [k for k, v in _resources(template, "AWS::IAM::Role").items() if role_predicate(k, v["Properties"])]
    assert len(roles) == 1, roles
    statements = []
    for policy in _resources(template, "AWS::IAM::Policy").values():
        if {"Ref": roles[0]} in policy["Properties"]["Roles"]:
            statements += policy["Properties"]["PolicyDocument"]["Statement"]
    assert statements
    return statements


def _resolve_url_suffix(value):
    """An image URI as the template writes it (Fn::Join around AWS::URLSuffix), as AWS resolves it in a region."""
    if isinstance(value, dict) and "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return sep.join("amazonaws.com" if part == {"Ref": "AWS::URLSuffix"} else part for part in parts)
    return value


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _assert_scoped(statements):
    for st in statements:
        for action in _as_list(st["Action"]):
            assert "*" not in action, st
        for resource in _as_list(st["Resource"]):
            assert resource != "*", st


def _actions(statements):
    return {a for st in statements for a in _as_list(st["Action"])}


def test_api_lambda_role_is_least_privilege(template):
    statements = _role_statements(template, lambda k, p: k.startswith("ApiFunction"))
    _assert_scoped(statements)
    actions = _actions(statements)
    assert {"sqs:SendMessage", "dynamodb:Query", "dynamodb:UpdateItem", "s3:GetObject", "s3:PutObject",
            "secretsmanager:GetSecretValue"} <= actions
    assert not actions & {"dynamodb:Scan", "sqs:ReceiveMessage", "sqs:DeleteMessage", "s3:ListBucket"}
    writes = [st for st in statements if "s3:PutObject" in _as_list(st["Action"])]
    # writes only to uploads/ and adapters/ (POST /v1/adapters keeps checked uploads), never to outputs/
    written = [json.dumps(r) for st in writes for r in _as_list(st["Resource"])]
    assert written and all(("/uploads/*" in r) != ("/adapters/*" in r) for r in written), written


def test_worker_role_is_least_privilege(template):
    statements = _role_statements(template, lambda k, p: k.startswith("WorkerTaskTaskRole"))
    _assert_scoped(statements)
    actions = _actions(statements)
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "dynamodb:UpdateItem",
            "s3:PutObject", "s3:GetObject"} <= actions
    # sqs:SendMessage: a task given back goes to the queue again (tests/test_aws_e2e.py checks every grant)
    assert not actions & {"dynamodb:Scan", "dynamodb:DeleteItem"}
    # one secret: the webhook-signing one (never the API key or the URL-signing secret)
    secrets = [st for st in statements if "secretsmanager:GetSecretValue" in _as_list(st["Action"])]
    webhook_secret = _logical_id(template, "AWS::SecretsManager::Secret", lambda p: "webhook" in json.dumps(p).lower())
    assert [st["Resource"] for st in secrets] == [{"Ref": webhook_secret}]
    dlq_id = _logical_id(template, "AWS::SQS::Queue", lambda p: "RedrivePolicy" not in p)
    assert any(st["Resource"] == {"Fn::GetAtt": [dlq_id, "Arn"]} for st in statements)  # drains the DLQ
    # reads the mirrored weights, writes nothing there
    reads = [st for st in statements if "/models/*" in json.dumps(st["Resource"])]
    assert reads and all(_as_list(st["Action"]) == ["s3:GetObject"] for st in reads)


def test_workers_fetch_weights_from_the_stacks_mirror(template):
    task_defs = _resources(template, "AWS::ECS::TaskDefinition").values()
    env = {e["Name"]: e["Value"] for td in task_defs for c in td["Properties"]["ContainerDefinitions"]
           for e in c.get("Environment", [])}
    assert env["ACESTEP_MODELS_MIRROR"] == "true" and env["ACESTEP_DEMO_IF_MISSING"] == "false"


def _container_env(template, kind) -> dict:
    """The environment of the one container (ECS task) or function (Lambda) of `kind`."""
    if kind == "AWS::ECS::TaskDefinition":
        (container,) = _one(template, kind)["ContainerDefinitions"]
        return {e["Name"]: e["Value"] for e in container["Environment"]}
    (function,) = [r["Properties"] for r in _resources(template, kind).values()
                   if "acestep" in json.dumps(r["Properties"].get("Environment", {})).lower()]
    return function["Environment"]["Variables"]


def test_engine_context_keys_reach_the_workers_only(synth):
    """-c quantize=int8 (and offload, init_llm, lm_model_path, lm_backend) become the worker container's
    ACESTEP_* variables, not the API Lambda's (it runs no engine); a stack given none sets none of them."""
    template = synth.templates[STACK]
    worker, api = _container_env(template, "AWS::ECS::TaskDefinition"), _container_env(template, "AWS::Lambda::Function")
    assert {k: worker.get(k) for k in ENGINE_ENV} == ENGINE_ENV
    assert "ACESTEP_BACKEND" in api and not set(ENGINE_ENV) & set(api)
    engine_vars = set(worker_engine.VARIABLE.values())
    assert len(engine_vars) == len(worker_engine.KEYS) and ENGINE_ENV.keys() <= engine_vars
    # a second model: both read it (the workers load it, the API lists it and routes `model` to it)
    assert worker["ACESTEP_CONFIG_PATH2"] == api["ACESTEP_CONFIG_PATH2"] == "acestep-v15-base"
    assert "ACESTEP_CONFIG_PATH3" not in worker and "ACESTEP_CONFIG_PATH3" not in api
    for name in ("DefaultImageInAccount", "DefaultImageNoAccount"):
        default = synth.templates[name]
        unset = engine_vars | {"ACESTEP_CONFIG_PATH2", "ACESTEP_CONFIG_PATH3"}
        assert not unset & set(_container_env(default, "AWS::ECS::TaskDefinition"))
        assert not unset & set(_container_env(default, "AWS::Lambda::Function"))


@pytest.mark.parametrize("key,value,allowed", [("quantize", "int4", "'none', 'int8' or 'fp8'"),
                                               ("offload", "cpu", "'none', 'auto' or 'modules'"),
                                               ("lm_backend", "tensorrt", "'pt', 'vllm' or 'auto'"),
                                               ("init_llm", "ture", "true, false or auto (or 1/yes/on for true")])
def test_a_bad_engine_context_value_stops_cdk_synth_naming_its_key(monkeypatch, key, value, allowed):
    """The CDK app's main() as `npx cdk synth -c quantize=int4` runs it (the CLI's context handed in here, not
    through CDK_CONTEXT_JSON, which the already started jsii runtime would not see): it exits before building
    anything, naming the key, the worker variable and the values the worker's loader takes."""
    from infra import app as cdk_app

    def must_not_build(app) -> str:
        raise AssertionError("went on to build the API zip with a bad setting")

    monkeypatch.setattr(cdk_app, "choose_lambda_package", must_not_build)
    with pytest.raises(SystemExit) as stopped:
        cdk_app.main(cdk.App(context={key: value}))
    message = str(stopped.value)
    assert f"`{key}` (-c {key}={value})" in message and worker_engine.VARIABLE[key] in message
    assert allowed in message
    with pytest.raises(worker_engine.EngineOptionError, match=f"`{key}`"):
        StackOptions(**{key: value})  # the stack itself, built in code, refuses it too


def test_engine_context_values_the_workers_refuse_together_stop_cdk_synth(monkeypatch):
    """quantize=int8 with lm_backend=vllm: each value alone is one the worker takes, but ACESTEP_QUANTIZE_LM
    inherits int8 and the worker's LM load refuses it on vLLM (engine.lm.backend_choice.quantize_refusal), so the
    synth stops naming both keys and what to set; quantize_lm=none (the DiT stays int8) or lm_backend=pt passes."""
    from infra import app as cdk_app

    monkeypatch.setattr(cdk_app, "choose_lambda_package", lambda app: pytest.fail("built the API zip anyway"))
    with pytest.raises(SystemExit) as stopped:
        cdk_app.main(cdk.App(context={"quantize": "int8", "lm_backend": "vllm"}))
    message = str(stopped.value)
    assert "-c quantize=int8 -c lm_backend=vllm" in message and "ACESTEP_QUANTIZE_LM=int8" in message
    assert "-c quantize_lm=none or -c lm_backend=pt" in message
    with pytest.raises(worker_engine.EngineOptionError, match="quantize_lm=none"):
        StackOptions(quantize="fp8", lm_backend="vllm")
    assert worker_engine.worker_environment({"quantize": "int8", "quantize_lm": "none", "lm_backend": "vllm"}) == {
        "ACESTEP_QUANTIZE": "int8", "ACESTEP_QUANTIZE_LM": "none", "ACESTEP_LM_BACKEND": "vllm"}
    assert worker_engine.worker_environment({"quantize": "int8", "lm_backend": "pt"})["ACESTEP_LM_BACKEND"] == "pt"


def test_workers_write_webhook_file_urls_under_the_edge_url(template):
    (task_def,) = _resources(template, "AWS::ECS::TaskDefinition").values()
    env = {e["Name"]: e["Value"] for c in task_def["Properties"]["ContainerDefinitions"]
           for e in c.get("Environment", [])}
    edge_id = _logical_id(template, "AWS::CloudFront::Distribution")
    assert env["ACESTEP_PUBLIC_BASE_URL"] == {"Fn::Join": ["", ["https://", {"Fn::GetAtt": [edge_id, "DomainName"]}]]}
    # Workers now refer to the edge, and the API (which wakes them) to the workers: no cycle.
    resources = template.to_json()["Resources"]

    def refs(value) -> set:
        if isinstance(value, dict):
            found = {value["Ref"]} if isinstance(value.get("Ref"), str) else set()
            if "Fn::GetAtt" in value:
                found.add(value["Fn::GetAtt"][0])
            return found.union(*(refs(v) for v in value.values()))
        return set().union(*(refs(v) for v in value)) if isinstance(value, list) else set()

    graph = {rid: (refs(r.get("Properties", {})) | set(_as_list(r.get("DependsOn", [])))) & set(resources)
             for rid, r in resources.items()}
    done: set = set()

    def visit(node, path):
        assert node not in path, f"dependency cycle: {path}"
        if node not in done:
            for nxt in graph[node]:
                visit(nxt, path | {node})
            done.add(node)

    for rid in graph:
        visit(rid, frozenset())


def test_worker_service_scales_on_backlog_per_worker_down_to_zero(template):
    target = _one(template, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert target["MinCapacity"] == 0 and target["MaxCapacity"] == 5
    service = _one(template, "AWS::ECS::Service")
    assert service["DesiredCount"] == 0
    # Replay the step policies against their alarms for every backlog size.
    policies = _resources(template, "AWS::ApplicationAutoScaling::ScalingPolicy")
    alarms = [a["Properties"] for a in _resources(template, "AWS::CloudWatch::Alarm").values()
              if any(ref.get("Ref") in policies for ref in a["Properties"].get("AlarmActions", []))]
    assert len(alarms) == 2
    for alarm in alarms:
        used = {m["MetricStat"]["Metric"]["MetricName"] for m in alarm["Metrics"] if "MetricStat" in m}
        assert used == {"ApproximateNumberOfMessagesVisible", "ApproximateNumberOfMessagesNotVisible"}

    def desired(backlog):
        for alarm in alarms:
            threshold, op = alarm["Threshold"], alarm["ComparisonOperator"]
            firing = backlog <= threshold if op.startswith("LessThan") else backlog >= threshold
            if not firing:
                continue
            policy = policies[alarm["AlarmActions"][0]["Ref"]]["Properties"]["StepScalingPolicyConfiguration"]
            assert policy["AdjustmentType"] == "ExactCapacity"
            for step in policy["StepAdjustments"]:
                low = step.get("MetricIntervalLowerBound", float("-inf"))
                high = step.get("MetricIntervalUpperBound", float("inf"))
                if low <= backlog - threshold <= high:
                    return step["ScalingAdjustment"]
        raise AssertionError(f"no step for backlog {backlog}")

    assert [desired(b) for b in range(0, 20)] == [workers_for_backlog(b, 3, 5) for b in range(0, 20)]
    assert desired(0) == 0 and desired(1) == 1 and desired(4) == 2 and desired(100) == 5


def test_gpu_capacity_provider_and_task(template):
    provider = _one(template, "AWS::ECS::CapacityProvider")
    assert provider["AutoScalingGroupProvider"]["ManagedScaling"]["Status"] == "ENABLED"
    asg = _one(template, "AWS::AutoScaling::AutoScalingGroup")
    assert asg["MinSize"] == "0" and asg["MaxSize"] == "5"
    ami_params = [p for p in template.to_json()["Parameters"].values() if "gpu" in str(p.get("Default", ""))]
    assert ami_params, "the ECS GPU-optimized AMI parameter"
    container = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"][0]
    assert {"Type": "GPU", "Value": "1"} in container["ResourceRequirements"]
    assert _resolve_url_suffix(container["Image"]) == ECR_IMAGE
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["ACESTEP_BACKEND"] == "aws" and env["ACESTEP_VISIBILITY_TIMEOUT"] == "240"
    assert "ACESTEP_DLQ_URL" in env and "ACESTEP_API_KEY" not in env
    assert container["StopTimeout"] == 120


def test_http_api_routes_to_the_lambda_entry(template):
    template.resource_count_is("AWS::ApiGatewayV2::Api", 1)
    fn = _resources(template, "AWS::Lambda::Function")[
        _logical_id(template, "AWS::Lambda::Function", lambda p: p.get("Handler") == "entrypoints.lambda_api.handler")]
    env = fn["Properties"]["Environment"]["Variables"]
    assert env["ACESTEP_BACKEND"] == "aws" and "ACESTEP_API_KEY_SECRET_ARN" in env and "ACESTEP_API_KEY" not in env
    assert fn["Properties"]["Runtime"] == f"python{LAMBDA_PYTHON}"


def test_zip_api_runs_with_snapstart_behind_an_alias_of_its_published_version(template):
    fn_id = _logical_id(template, "AWS::Lambda::Function", lambda p: p.get("Handler") == "entrypoints.lambda_api.handler")
    fn = _resources(template, "AWS::Lambda::Function")[fn_id]
    assert fn["Properties"]["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    version_id = _logical_id(template, "AWS::Lambda::Version", lambda p: p["FunctionName"] == {"Ref": fn_id})
    alias = next(iter(_resources(template, "AWS::Lambda::Alias").values()))["Properties"]
    assert alias["FunctionVersion"] == {"Fn::GetAtt": [version_id, "Version"]}
    # the gateway invokes the alias (the snapshotted version), never $LATEST, which has no snapshot
    integration = next(iter(_resources(template, "AWS::ApiGatewayV2::Integration").values()))["Properties"]
    alias_id = next(iter(_resources(template, "AWS::Lambda::Alias")))
    assert integration["IntegrationUri"] == {"Ref": alias_id}


def test_alarms_watch_dead_letters_queue_age_and_lambda_errors(template):
    dlq_id = _logical_id(template, "AWS::SQS::Queue", lambda p: "RedrivePolicy" not in p)
    template.has_resource_properties("AWS::CloudWatch::Alarm", {
        "MetricName": "ApproximateNumberOfMessagesVisible", "Threshold": 1,
        "Dimensions": [{"Name": "QueueName", "Value": {"Fn::GetAtt": [dlq_id, "QueueName"]}}],
        "AlarmActions": Match.any_value()})
    template.has_resource_properties("AWS::CloudWatch::Alarm", {"MetricName": "ApproximateAgeOfOldestMessage"})
    template.has_resource_properties("AWS::CloudWatch::Alarm", {"MetricName": "Errors", "Namespace": "AWS/Lambda"})


def test_alarm_names_a_worker_that_cannot_load_its_model(template):
    """The metric the worker writes (tests/test_observability.py checks its EMF record) raises an alarm."""
    template.has_resource_properties("AWS::CloudWatch::Alarm", {
        "MetricName": "WorkerLoadFailures", "Namespace": "ACEStep",
        "Dimensions": [{"Name": "service", "Value": "worker"}], "Threshold": 1,
        "AlarmDescription": Match.string_like_regexp("could not load its models"),
        "AlarmActions": Match.any_value()})


# -- cdk-nag -------------------------------------------------------------------------------------

def test_cdk_nag_reports_no_unacknowledged_finding(synthesized):
    _, report, _ = synthesized
    findings = _findings(report)
    assert findings == [], "fix these, or acknowledge them with a reason (infra/nag.py: suppress):\n" + "\n".join(findings)


def test_cdk_nag_harness_sees_a_finding(tmp_path):
    """The check above can fail: a queue without a dead-letter queue is reported by both packs."""
    from aws_cdk import aws_sqs as sqs

    app = cdk.App(outdir=str(tmp_path), context={"@aws-cdk/core:validationReportJson": True})
    sqs.Queue(cdk.Stack(app, "Canary"), "NoDlq", enforce_ssl=True)
    rules = {line.split(" at ")[0] for line in _findings(synth_with_nag(app, tmp_path))}
    assert {"AwsSolutions-SQS3", "Serverless-SQSRedrivePolicy"} <= rules


def test_every_acknowledged_rule_says_why(synthesized):
    _, _, acknowledged = synthesized
    rules = {rule: reason for acks in acknowledged.values() for ack in acks for rule, reason in ack.items()
             if rule.startswith(("AwsSolutions::", "Serverless::"))}
    assert len(rules) >= 10
    short = {rule: reason for rule, reason in rules.items() if len(reason.split()) < 6}
    assert not short, short
    # Acknowledged where the resource is defined, never for the whole stack.
    assert not [rule for ack in acknowledged.get(STACK, []) for rule in ack if rule.startswith(("AwsSolutions", "Serverless"))]


# -- issue #12: what each fix put in the template ------------------------------------------------

def test_gpu_hosts_run_the_amazon_linux_2023_gpu_ami(template):
    defaults = [str(p.get("Default", "")) for p in template.to_json()["Parameters"].values()]
    assert any("/ecs/optimized-ami/amazon-linux-2023/gpu/" in d for d in defaults), defaults
    assert not any("amazon-linux-2/" in d for d in defaults)


def test_running_tasks_are_protected_from_scale_in(template):
    provider = _one(template, "AWS::ECS::CapacityProvider")["AutoScalingGroupProvider"]
    assert provider["ManagedTerminationProtection"] == "ENABLED" and provider["ManagedDraining"] == "ENABLED"
    assert _one(template, "AWS::AutoScaling::AutoScalingGroup")["NewInstancesProtectedFromScaleIn"] is True
    statements = _role_statements(template, lambda k, p: k.startswith("WorkerTaskTaskRole"))
    protect = [st for st in statements if "ecs:UpdateTaskProtection" in _as_list(st["Action"])]
    assert len(protect) == 1 and ":task/" in json.dumps(protect[0]["Resource"])  # the cluster's tasks only


def test_spot_instances_drain_on_interruption(template):
    launch = _one(template, "AWS::EC2::LaunchTemplate")["LaunchTemplateData"]
    assert "ECS_ENABLE_SPOT_INSTANCE_DRAINING=true" in json.dumps(launch["UserData"])


def test_spot_draws_from_several_instance_types(template):
    """One spot pool running dry must not stop the workers: several 24 GB-GPU types, all spot, capped price."""
    policy = _one(template, "AWS::AutoScaling::AutoScalingGroup")["MixedInstancesPolicy"]
    types = [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]]
    assert types[0] == "g5.xlarge" and len(set(types)) == len(types) >= 3
    assert policy["InstancesDistribution"] == {
        "OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 0,
        "SpotAllocationStrategy": "price-capacity-optimized", "SpotMaxPrice": "1.006"}
    assert "InstanceType" not in _one(template, "AWS::EC2::LaunchTemplate")["LaunchTemplateData"]


def test_on_demand_keeps_one_instance_type(synth):
    template = synth.templates["DefaultImageInAccount"]
    asg = _one(template, "AWS::AutoScaling::AutoScalingGroup")
    assert "MixedInstancesPolicy" not in asg and "LaunchTemplate" in asg
    launch = _one(template, "AWS::EC2::LaunchTemplate")["LaunchTemplateData"]
    assert launch["InstanceType"] == "g5.xlarge" and "InstanceMarketOptions" not in launch
    assert "ECS_ENABLE_SPOT_INSTANCE_DRAINING" not in json.dumps(launch["UserData"])
    assert launch["MetadataOptions"]["HttpTokens"] == "required"
    assert launch["BlockDeviceMappings"][0]["Ebs"] == {"Encrypted": True, "VolumeSize": 120, "VolumeType": "gp3"}


def test_worker_container_health_check_reads_the_heartbeat_file(template):
    container = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"][0]
    check = container["HealthCheck"]
    assert check["Command"] == ["CMD", "acestep-worker", "--healthcheck", "--heartbeat-file", HEARTBEAT_FILE]
    assert container["Command"][-2:] == ["--heartbeat-file", HEARTBEAT_FILE]  # the worker writes what it reads
    assert check["Retries"] >= 2 and check["StartPeriod"] >= 60


def test_stage_throttles_and_writes_access_logs(template):
    stage = _one(template, "AWS::ApiGatewayV2::Stage")
    assert stage["StageName"] == "$default" and stage["AutoDeploy"] is True
    assert stage["DefaultRouteSettings"] == {"ThrottlingRateLimit": 40, "ThrottlingBurstLimit": 80}
    destination = stage["AccessLogSettings"]["DestinationArn"]["Fn::GetAtt"][0]
    assert template.to_json()["Resources"][destination]["Type"] == "AWS::Logs::LogGroup"
    assert "$context.requestId" in stage["AccessLogSettings"]["Format"]


def test_api_lambda_concurrency_is_reserved(template):
    fn = _resources(template, "AWS::Lambda::Function")[
        _logical_id(template, "AWS::Lambda::Function", lambda p: p.get("Handler") == "entrypoints.lambda_api.handler")]
    assert fn["Properties"]["ReservedConcurrentExecutions"] == 25


def test_cors_has_one_source_the_apps_setting(template):
    api = _one(template, "AWS::ApiGatewayV2::Api")
    assert "CorsConfiguration" not in api  # the gateway would answer preflights with its own list
    fn = _resources(template, "AWS::Lambda::Function")[
        _logical_id(template, "AWS::Lambda::Function", lambda p: p.get("Handler") == "entrypoints.lambda_api.handler")]
    assert fn["Properties"]["Environment"]["Variables"]["ACESTEP_CORS_ORIGINS"] == ORIGINS
    audio = _resources(template, "AWS::S3::Bucket")[
        _logical_id(template, "AWS::S3::Bucket", lambda p: "CorsConfiguration" in p)]["Properties"]
    assert audio["CorsConfiguration"]["CorsRules"][0]["AllowedOrigins"] == ORIGINS.split(",")


def test_audio_bucket_and_vpc_log_to_the_access_log_bucket(template):
    buckets = _resources(template, "AWS::S3::Bucket")
    audio = buckets[_logical_id(template, "AWS::S3::Bucket", lambda p: "LoggingConfiguration" in p)]["Properties"]
    log_bucket = audio["LoggingConfiguration"]["DestinationBucketName"]["Ref"]
    assert buckets[log_bucket]["Properties"]["LifecycleConfiguration"]["Rules"][0]["ExpirationInDays"] == 90
    flow = _one(template, "AWS::EC2::FlowLog")
    assert flow["LogDestinationType"] == "s3" and log_bucket in json.dumps(flow["LogDestination"])


def test_api_may_start_only_the_worker_service(template):
    fn = _resources(template, "AWS::Lambda::Function")[
        _logical_id(template, "AWS::Lambda::Function", lambda p: p.get("Handler") == "entrypoints.lambda_api.handler")]
    env = fn["Properties"]["Environment"]["Variables"]
    service_id = _logical_id(template, "AWS::ECS::Service")
    assert env["ACESTEP_ECS_SERVICE"] == {"Fn::GetAtt": [service_id, "Name"]} and "ACESTEP_ECS_CLUSTER" in env
    statements = _role_statements(template, lambda k, p: k.startswith("ApiFunction"))
    wake = [st for st in statements if "ecs:UpdateService" in _as_list(st["Action"])]
    assert wake == [{"Sid": "WakeWorkers", "Effect": "Allow", "Action": ["ecs:DescribeServices", "ecs:UpdateService"],
                     "Resource": {"Ref": service_id}}]


def test_cloudfront_with_waf_fronts_the_api(template):
    dist = _one(template, "AWS::CloudFront::Distribution")["DistributionConfig"]
    acl_id = _logical_id(template, "AWS::WAFv2::WebACL")
    assert dist["WebACLId"] == {"Fn::GetAtt": [acl_id, "Arn"]}
    assert {"GET", "POST", "OPTIONS"} <= set(dist["DefaultCacheBehavior"]["AllowedMethods"])
    assert "Logging" in dist
    acl = _one(template, "AWS::WAFv2::WebACL")
    assert acl["Scope"] == "CLOUDFRONT"
    rate = [r for r in acl["Rules"] if "RateBasedStatement" in r["Statement"]]
    assert rate[0]["Statement"]["RateBasedStatement"] == {"Limit": 600, "AggregateKeyType": "IP"}


def test_cloudfront_waf_outside_us_east_1_needs_an_existing_acl(tmp_path):
    app = cdk.App()
    with pytest.raises(ValueError, match="waf_web_acl_arn"):
        AceStepStack(app, "Elsewhere", StackOptions(worker_image="x:y", lambda_asset_dir=str(tmp_path),
                                                    cloudfront=True),
                     env=cdk.Environment(account="123456789012", region="eu-west-1"))


def test_cdk_app_ships_the_api_as_a_snapstart_zip_unless_asked_for_the_image():
    from infra.app import LAMBDA_BUILD_DIR, choose_lambda_package

    built: list[str] = []
    app = cdk.App()
    assert choose_lambda_package(app, build=built.append) == str(LAMBDA_BUILD_DIR)
    assert built == [str(LAMBDA_BUILD_DIR)]  # package_lambda.main, which needs PyPI, is the builder by default
    assert StackOptions.from_context(app).lambda_asset_dir == str(LAMBDA_BUILD_DIR)

    def must_not_build(out: str) -> None:
        raise AssertionError("built a zip although none was wanted")

    assert choose_lambda_package(cdk.App(context={"lambda_packaging": "image"}), build=must_not_build) == ""
    assert choose_lambda_package(cdk.App(context={"lambda_asset_dir": "/prebuilt"}), build=must_not_build) == "/prebuilt"


# -- issue #19: the paths an operator deploys, with and without an account -------------------------

def test_every_deployable_path_synthesizes_and_passes_cdk_nag(synth):
    """The default image asset, a private ECR image and a public one, with an account and without: all synthesized
    by the module's one app, and none with an unacknowledged finding (the report covers every stack)."""
    assert set(synth.templates) == set(VARIANTS)
    findings = _findings(synth.report)
    assert findings == [], "\n".join(findings)
    reported = {r["constructPath"].split("/")[0] for plugin in synth.report["pluginReports"]
                for v in plugin["violations"] for r in v["violatingResources"]}
    assert not reported


def _statements_of(template, role_prefix):
    return _role_statements(template, lambda k, p: k.startswith(role_prefix))


def _pull_statement(template):
    pulls = [st for st in _statements_of(template, "WorkerTaskExecutionRole")
             if "ecr:BatchGetImage" in _as_list(st["Action"])]
    assert len(pulls) == 1, pulls
    assert {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= set(_as_list(pulls[0]["Action"]))
    return pulls[0]


@pytest.mark.parametrize("name", ["DefaultImageInAccount", "DefaultImageNoAccount"])
def test_default_worker_image_is_the_dockerfile_staged_at_synth(synth, name):
    """No daemon at synth: the build context is staged into cdk.out with its Dockerfile and target; the execution
    role pulls from the bootstrap's asset repository only."""
    assets = json.loads((synth.out / f"{name}.assets.json").read_text())
    (image,) = assets["dockerImages"].values()
    assert image["source"]["dockerBuildTarget"] == "worker"
    staged = synth.out / image["source"]["directory"]
    assert (staged / "Dockerfile").is_file() and (staged / "pyproject.toml").is_file()
    assert not (staged / ".venv").exists() and not (staged / "infra" / "node_modules").exists()
    template = synth.templates[name]
    container = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"][0]
    assert "container-assets" in json.dumps(container["Image"])
    assert "container-assets" in json.dumps(_pull_statement(template)["Resource"])


def test_the_stack_without_an_account_names_none(synth):
    for name in ("DefaultImageNoAccount", "EcrImageNoAccount"):
        text = json.dumps(synth.templates[name].to_json())
        assert "123456789012" not in text and "us-east-1" not in text
        assert '{"Ref": "AWS::AccountId"}' in text


@pytest.mark.parametrize("name", ["EcrImageInAccount", "EcrImageNoAccount"])
def test_private_ecr_worker_image_is_pullable_by_the_task(synth, name):
    """Without ecr:BatchGetImage/GetDownloadUrlForLayer on its repository the task stops with CannotPullContainerError."""
    template = synth.templates[name]
    assert _pull_statement(template)["Resource"] == "arn:aws:ecr:eu-west-1:210987654321:repository/team/acestep-worker"
    login = [st for st in _statements_of(template, "WorkerTaskExecutionRole")
             if "ecr:GetAuthorizationToken" in _as_list(st["Action"])]
    assert login == [{"Action": "ecr:GetAuthorizationToken", "Effect": "Allow", "Resource": "*"}]
    container = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"][0]
    assert _resolve_url_suffix(container["Image"]) == OTHER_ECR_IMAGE


def test_the_only_wildcard_of_the_execution_role_is_the_registry_login(synth):
    """The acknowledged IAM5 on the execution role covers GetAuthorizationToken (no resource exists for it), nothing else."""
    for name in ("DefaultImageInAccount", "EcrImageNoAccount", STACK):
        wild = [st for st in _statements_of(synth.templates[name], "WorkerTaskExecutionRole")
                if "*" in _as_list(st["Resource"])]
        assert [_as_list(st["Action"]) for st in wild] == [["ecr:GetAuthorizationToken"]]
        acks = {rule for path, acks in synth.acknowledged[name].items() if path.endswith("WorkerTask/ExecutionRole")
                for ack in acks for rule in ack}
        assert acks == {"AwsSolutions::AwsSolutions-IAM5[Resource::*]"}


def test_a_public_worker_image_needs_no_pull_permission(synth):
    template = synth.templates["PublicImage"]
    container = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"][0]
    assert container["Image"] == "public.ecr.aws/acme/acestep-worker:1"
    actions = _actions(_statements_of(template, "WorkerTaskExecutionRole"))
    assert not {a for a in actions if a.startswith("ecr:")}


def test_ecr_image_uris_are_recognised():
    assert parse_ecr_image(ECR_IMAGE) == {"account": "123456789012", "region": "us-east-1",
                                          "name": "acestep-worker", "tag": "test"}
    assert parse_ecr_image("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/a/b")["tag"] == "latest"
    assert parse_ecr_image(OTHER_ECR_IMAGE)["tag"] == "sha256:" + "ab" * 32
    for other in ("public.ecr.aws/acme/w:1", "ghcr.io/acme/w:1", "acestep-worker:1", "docker.io/library/python:3"):
        assert parse_ecr_image(other) is None


def test_outputs_name_what_an_operator_needs(synth):
    for name in ("DefaultImageNoAccount", STACK):
        outputs = synth.templates[name].to_json()["Outputs"]
        assert {"ApiUrl", "ApiKeySecretArn", "BucketName", "TableName", "QueueUrl", "DlqUrl", "ClusterName",
                "WorkerServiceName", "WorkerLogGroup", "ApiLogGroup", "ApiAccessLogGroup", "TaskStartFailureLogGroup",
                "AlarmTopicArn", "DashboardName"} <= set(outputs)
        resources = synth.templates[name].to_json()["Resources"]
        bucket = outputs["BucketName"]["Value"]["Ref"]
        assert "LoggingConfiguration" in resources[bucket]["Properties"]  # the audio bucket, not the log bucket
        assert outputs["TableName"]["Value"] == {"Ref": _logical_id(synth.templates[name], "AWS::DynamoDB::Table")}


def test_an_alarm_fires_within_minutes_when_workers_cannot_start(template):
    """Stopped-before-working tasks, the scheduler's placement warnings and failed GPU launches are each caught by a
    rule that logs the event; one alarm on the rules' match counts (1-minute periods) notifies the topic."""
    resources = template.to_json()["Resources"]
    rules = {k: r["Properties"] for k, r in resources.items() if r["Type"] == "AWS::Events::Rule"}
    patterns = {json.dumps(r["EventPattern"]["detail-type"]): r["EventPattern"] for r in rules.values()}
    stopped = patterns['["ECS Task State Change"]']["detail"]
    assert stopped["lastStatus"] == ["STOPPED"]
    assert {"stopCode": ["TaskFailedToStart", "EssentialContainerExited"]} in stopped["$or"]
    reasons = [p["prefix"] for alt in stopped["$or"] for p in alt.get("stoppedReason", [])]
    assert {"CannotPullContainerError", "ResourceInitializationError"} <= set(reasons)
    assert "SERVICE_TASK_PLACEMENT_FAILURE" in patterns['["ECS Service Action"]']["detail"]["eventName"]
    assert patterns['["EC2 Instance Launch Unsuccessful"]']["source"] == ["aws.autoscaling"]
    # every rule writes to the failure log group, which a resource policy opens to EventBridge
    log_group = _logical_id(template, "AWS::Logs::LogGroup",
                            lambda p: "task-start-failures" in json.dumps(p.get("LogGroupName", "")))
    assert all(len(r["Targets"]) == 1 and "log-group" in json.dumps(r["Targets"][0]["Arn"]) for r in rules.values())
    policy = json.loads(json.dumps(_one(template, "AWS::Logs::ResourcePolicy")))
    assert "events.amazonaws.com" in json.dumps(policy) and log_group in json.dumps(policy)
    alarm = next(a["Properties"] for a in _resources(template, "AWS::CloudWatch::Alarm").values()
                 if "cannot start" in a["Properties"].get("AlarmDescription", ""))
    counted = {json.dumps(m["MetricStat"]["Metric"]["Dimensions"][0]["Value"]) for m in alarm["Metrics"]
               if "MetricStat" in m}
    assert counted == {json.dumps({"Ref": rule}) for rule in rules}
    assert all(m["MetricStat"]["Period"] == 60 for m in alarm["Metrics"] if "MetricStat" in m)
    assert alarm["EvaluationPeriods"] == 1 and alarm["Threshold"] == 1 and alarm["AlarmActions"]


def test_dashboard_shows_queue_workers_api_and_dead_letters(template):
    body = json.dumps(_one(template, "AWS::CloudWatch::Dashboard")["DashboardBody"])
    for metric in ("ApproximateNumberOfMessagesVisible", "ApproximateAgeOfOldestMessage", "RunningTaskCount",
                   "PendingTaskCount", "GroupInServiceInstances", "5xx", "Latency", "TasksFailed", "RunSeconds"):
        assert metric in body, metric
    assert "alarm" in body  # the alarm status row


def test_templates_pass_cfn_lint(synth):
    """CloudFormation's resource schemas and rules (cfn-lint), on the all-options stack and the default one as a
    synth without credentials writes it: an error fails (a property CloudFormation would refuse at deploy);
    warnings are CDK's own idioms. About 3 s quiet, mostly cfn-lint loading its schemas."""
    templates = [str(synth.out / f"{name}.template.json") for name in (STACK, "DefaultImageNoAccount")]
    cli = "import sys; from cfnlint.runner import main; sys.exit(main())"  # the cfn-lint command, in this venv
    run = subprocess.run([sys.executable, "-c", cli, "--format", "json", *templates], capture_output=True,
                         text=True, timeout=120)
    findings = json.loads(run.stdout or "[]")
    assert findings or run.returncode == 0, run.stderr
    errors = [f"{f['Rule']['Id']} {'/'.join(map(str, f['Location']['Path']))}: {f['Message']}"
              for f in findings if f["Level"] == "Error"]
    assert not errors, "\n".join(errors)

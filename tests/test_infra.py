"""The CDK app synthesises offline, and the template has the resources, IAM scoping and scaling we rely on."""
from __future__ import annotations

import json

import pytest

cdk = pytest.importorskip("aws_cdk", reason="aws-cdk-lib is not installed (pip install '.[infra]')")
from aws_cdk.assertions import Match, Template  # noqa: E402

from infra.acestep_stack import AceStepStack, StackOptions, workers_for_backlog  # noqa: E402
from service.aws import schema  # noqa: E402

OPTIONS = dict(max_workers=5, backlog_per_worker=3, max_receives=4, lease_seconds=240, task_ttl_days=9,
               worker_image="123456789012.dkr.ecr.us-east-1.amazonaws.com/acestep-worker:test")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    asset = tmp_path_factory.mktemp("lambda_pkg")
    (asset / "placeholder.txt").write_text("built by infra/README.md's package step\n")
    app = cdk.App()
    stack = AceStepStack(app, "AceStepTest", StackOptions(lambda_asset_dir=str(asset), **OPTIONS),
                         env=cdk.Environment(account="123456789012", region="us-east-1"))
    return Template.from_stack(stack)


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


def test_queue_redrives_to_the_dlq_and_outlives_the_lease(template):
    dlq_id = _logical_id(template, "AWS::SQS::Queue", lambda p: "RedrivePolicy" not in p)
    queue = _resources(template, "AWS::SQS::Queue")[
        _logical_id(template, "AWS::SQS::Queue", lambda p: "RedrivePolicy" in p)]["Properties"]
    assert queue["RedrivePolicy"] == {"deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]}, "maxReceiveCount": 4}
    assert queue["VisibilityTimeout"] > OPTIONS["lease_seconds"]
    assert queue["ReceiveMessageWaitTimeSeconds"] == 20


def test_bucket_is_private_encrypted_and_expires_task_files(template):
    bucket = _one(template, "AWS::S3::Bucket")
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"][
        "SSEAlgorithm"] == "AES256"
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
    assert all(json.dumps(st["Resource"]).count("/uploads/*") == 1 for st in writes)  # no writes to outputs/


def test_worker_role_is_least_privilege(template):
    statements = _role_statements(template, lambda k, p: k.startswith("WorkerTaskTaskRole"))
    _assert_scoped(statements)
    actions = _actions(statements)
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "dynamodb:UpdateItem",
            "s3:PutObject", "s3:GetObject"} <= actions
    assert not actions & {"dynamodb:Scan", "dynamodb:DeleteItem", "sqs:SendMessage", "secretsmanager:GetSecretValue"}
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
    launch = _one(template, "AWS::EC2::LaunchTemplate")["LaunchTemplateData"]
    assert launch["InstanceType"] == "g5.xlarge"
    ami_params = [p for p in template.to_json()["Parameters"].values() if "gpu" in str(p.get("Default", ""))]
    assert ami_params, "the ECS GPU-optimized AMI parameter"
    container = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"][0]
    assert {"Type": "GPU", "Value": "1"} in container["ResourceRequirements"]
    assert container["Image"] == OPTIONS["worker_image"]
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
    assert fn["Properties"]["Runtime"] == "python3.11"


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

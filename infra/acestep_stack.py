"""The AWS deployment: HTTP API + Lambda, DynamoDB, SQS + DLQ, S3, and GPU workers on ECS.

Knobs come from CDK context (`cdk deploy -c key=value`); see StackOptions for the names and
defaults, and infra/README.md for what they cost.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from aws_cdk import (
    ArnFormat,
    CfnOutput,
    Duration,
    Fn,
    RemovalPolicy,
    Stack,
    Token,
    aws_apigateway as apigw_v1,
    aws_apigatewayv2 as apigw,
    aws_apigatewayv2_integrations as integrations,
    aws_applicationautoscaling as appscaling,
    aws_autoscaling as autoscaling,
    aws_cloudfront as cloudfront,
    aws_cloudfront_origins as origins,
    aws_cloudwatch as cloudwatch,
    aws_cloudwatch_actions as cw_actions,
    aws_dynamodb as dynamodb,
    aws_ec2 as ec2,
    aws_ecr as ecr,
    aws_ecs as ecs,
    aws_events as events,
    aws_iam as iam,
    aws_lambda as lambda_,
    aws_logs as logs,
    aws_s3 as s3,
    aws_secretsmanager as secretsmanager,
    aws_sns as sns,
    aws_sns_subscriptions as subscriptions,
    aws_sqs as sqs,
    aws_wafv2 as wafv2,
)
import jsii
from constructs import Construct

from infra.nag import suppress
from infra.package_lambda import LAMBDA_PYTHON

from service.aws import schema
from service.blob_keys import ADAPTERS_PREFIX, MODELS_PREFIX
from service.blob_keys import OUTPUTS_PREFIX as OUTPUT_PREFIX
from service.observability.metrics import NAMESPACE as METRICS_NAMESPACE
from service.blob_keys import UPLOADS_PREFIX as UPLOAD_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]
# The API zip's runtime, by the Python version infra/package_lambda.py builds for (3.12+ has SnapStart).
_LAMBDA_RUNTIMES = {"3.12": lambda_.Runtime.PYTHON_3_12, "3.13": lambda_.Runtime.PYTHON_3_13}
# The worker writes its heartbeat here; the container health check reads it (acestep-worker --healthcheck).
HEARTBEAT_FILE = "/tmp/acestep-heartbeat.json"
# The fields of one access-log line of the HTTP API (JSON, one object per request).
ACCESS_LOG_FORMAT = json.dumps({
    "requestId": "$context.requestId", "ip": "$context.identity.sourceIp", "time": "$context.requestTime",
    "method": "$context.httpMethod", "path": "$context.path", "status": "$context.status",
    "bytes": "$context.responseLength", "latencyMs": "$context.responseLatency",
    "integrationLatencyMs": "$context.integrationLatency", "error": "$context.integrationErrorMessage",
    "userAgent": "$context.identity.userAgent",
})

# A private ECR image (`-c worker_image=<account>.dkr.ecr.<region>.amazonaws.com/<repo>[:tag|@digest]`): the
# task's execution role is granted pull on that repository. Any other registry is pulled anonymously.
ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                       r"(?P<name>[a-z0-9][a-z0-9._/-]*?)(?::(?P<tag>[\w][\w.-]*)|@(?P<digest>sha256:[0-9a-f]{64}))?$")
# ECS stop codes and reasons of a task that never got to work: image pull, secrets/volumes, the worker
# exiting or failing its health check. Scale-in and deployments stop tasks with other codes.
TASK_START_FAILURE_CODES = ["TaskFailedToStart", "EssentialContainerExited"]
TASK_START_FAILURE_REASONS = ["CannotPullContainerError", "ResourceInitializationError", "CannotStartContainerError",
                              "Task failed container health checks"]
# ECS service events that say the scheduler cannot place or start tasks (capacity, configuration).
SERVICE_START_FAILURE_EVENTS = ["SERVICE_TASK_PLACEMENT_FAILURE", "SERVICE_TASK_CONFIGURATION_FAILURE",
                                "SERVICE_TASK_START_IMPAIRED"]


def parse_ecr_image(uri: str) -> Optional[dict[str, str]]:
    """account, region, name and tag (or digest) of a private ECR image URI; None for any other registry."""
    match = ECR_IMAGE.match(uri)
    if match is None:
        return None
    parts = {k: v for k, v in match.groupdict().items() if v}
    parts.setdefault("tag", parts.pop("digest", "latest"))
    return parts


def _partition_of(region: str) -> str:
    return "aws-cn" if region.startswith("cn-") else "aws-us-gov" if region.startswith("us-gov-") else "aws"


@dataclass
class StackOptions:
    """Deployment knobs; each is also a CDK context key of the same name."""

    # Lambda code: a directory holding the built zip package (SnapStart; infra/app.py builds it
    # unless told `lambda_packaging=image`), or empty for the Dockerfile's `lambda` target as a
    # container image built at deploy time (no SnapStart).
    lambda_asset_dir: str = ""
    # Worker image: a registry URI (e.g. an ECR repo you pushed to), or empty to build the
    # Dockerfile's `worker` target at deploy time.
    worker_image: str = ""
    instance_type: str = "g5.xlarge"  # 1x A10G 24 GB; g6.xlarge (1x L4 24 GB) also works
    # On spot (spot_max_price), the instance group draws from instance_type and these (comma-separated):
    # several pools, so one type running out of spot capacity does not stop the workers. All have 24 GB GPUs.
    spot_instance_types: str = "g6.xlarge,g5.2xlarge,g6.2xlarge"
    max_workers: int = 4
    backlog_per_worker: int = 4  # queued + running tasks one worker is expected to carry
    queue_maxsize: int = 200
    max_receives: int = 3
    lease_seconds: int = 300  # worker lease; it is extended every lease/3 while a task runs
    task_ttl_days: int = 7
    audio_url_ttl: int = 3600
    oldest_message_alarm_seconds: int = 1800
    api_key_secret_arn: str = ""  # an existing secret; empty creates one with a generated key
    alarm_email: str = ""
    config_path: str = "acestep-v15-turbo"
    destroy_data_on_delete: bool = False  # tear-down removes the table and bucket too
    # Browser origins allowed to call the API and to PUT/GET presigned S3 URLs (comma-separated). The
    # app's ACESTEP_CORS_ORIGINS and the bucket's CORS rule both come from this one value; the HTTP API
    # has no CORS configuration of its own. Empty: no browser origins.
    cors_origins: str = ""
    api_rate_limit: int = 50  # stage throttling: steady requests per second across all clients
    api_burst_limit: int = 100
    # Reserved concurrency of the API Lambda (caps its cost under a flood); 0 = none reserved. An account
    # must keep 100 executions unreserved, so low-limit accounts cannot reserve any.
    api_reserved_concurrency: int = 0
    # Run the GPU instances on spot at this maximum hourly price (e.g. the on-demand price); empty = on-demand.
    spot_max_price: str = ""
    # CloudFront in front of the HTTP API with a WAF web ACL (HTTP APIs cannot take WAF directly). The
    # ACL is created here (needs the stack in us-east-1, CloudFront's WAF region) unless one is given.
    cloudfront: bool = False
    waf_web_acl_arn: str = ""
    waf_rate_limit: int = 1000  # requests per 5 minutes from one IP before WAF blocks it

    @classmethod
    def from_context(cls, scope: Construct) -> "StackOptions":
        values = {}
        for f in fields(cls):
            raw = scope.node.try_get_context(f.name)
            if raw is None:
                continue
            kind = type(getattr(cls, f.name))
            if kind is bool:
                values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            else:
                values[f.name] = kind(raw)
        return cls(**values)


def backlog_steps(backlog_per_worker: int, max_workers: int) -> list[appscaling.ScalingInterval]:
    """Exact-capacity steps: ceil(backlog / backlog_per_worker) workers, 0 when nothing is queued or running.

    Bounds sit at half-integers so an integer backlog never lands on the edge between two steps
    (where the scale-in and scale-out alarms would both fire).
    """
    steps = [appscaling.ScalingInterval(upper=0.5, change=0)]
    for workers in range(1, max_workers + 1):
        lower = (workers - 1) * backlog_per_worker + 0.5
        upper = workers * backlog_per_worker + 0.5 if workers < max_workers else None
        steps.append(appscaling.ScalingInterval(lower=lower, upper=upper, change=workers))
    return steps


class AceStepStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, options: Optional[StackOptions] = None, **kwargs):
        super().__init__(scope, construct_id, **kwargs)
        # New AWS accounts cannot create launch configurations: have the ASG use a launch template.
        self.node.set_context("@aws-cdk/aws-autoscaling:generateLaunchTemplateInsteadOfLaunchConfig", True)
        self.options = opts = options or StackOptions.from_context(self)
        removal = RemovalPolicy.DESTROY if opts.destroy_data_on_delete else RemovalPolicy.RETAIN

        # -- storage ---------------------------------------------------------------------------
        self.table = dynamodb.Table(
            self, "Tasks",
            partition_key=dynamodb.Attribute(name=schema.PK, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute=schema.TTL_ATTR,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            removal_policy=removal,
        )
        self.table.add_global_secondary_index(
            index_name=schema.QUEUED_INDEX,
            partition_key=dynamodb.Attribute(name=schema.QUEUED_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.QUEUED_SORT, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.KEYS_ONLY,
        )
        self.table.add_global_secondary_index(
            index_name=schema.FINISHED_INDEX,
            partition_key=dynamodb.Attribute(name=schema.FINISHED_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.FINISHED_SORT, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.INCLUDE,
            non_key_attributes=[schema.DURATION_ATTR],
        )
        self.table.add_global_secondary_index(  # the webhook outbox (service/aws/schema.py)
            index_name=schema.WEBHOOK_INDEX,
            partition_key=dynamodb.Attribute(name=schema.WEBHOOK_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.WEBHOOK_DUE, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.INCLUDE,
            non_key_attributes=["webhook_url", schema.WEBHOOK_ATTEMPTS],
        )
        self.table.add_global_secondary_index(  # queued tasks whose message is not known sent (service/aws/ghosts.py)
            index_name=schema.UNSENT_INDEX,
            partition_key=dynamodb.Attribute(name=schema.UNSENT_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.UNSENT_SINCE, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.KEYS_ONLY,
        )

        cors_origins = [o.strip() for o in opts.cors_origins.split(",") if o.strip()]
        # Access logs of the audio bucket (and of CloudFront, when it is on): kept 90 days.
        self.log_bucket = s3.Bucket(
            self, "AccessLogs",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            # CloudFront's standard logs are delivered with an ACL grant, which needs ACLs enabled.
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            removal_policy=removal,
            auto_delete_objects=opts.destroy_data_on_delete,
            lifecycle_rules=[s3.LifecycleRule(id="expire-logs", expiration=Duration.days(90))],
        )
        suppress(self.log_bucket, ("AwsSolutions-S1", "This is the access-log bucket: logging its own accesses "
                                                      "would log the log deliveries."))
        self.bucket = s3.Bucket(
            self, "Audio",
            server_access_logs_bucket=self.log_bucket,
            server_access_logs_prefix="audio/",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            removal_policy=removal,
            auto_delete_objects=opts.destroy_data_on_delete,
            lifecycle_rules=[
                # Files live as long as the task records that point at them.
                s3.LifecycleRule(id="expire-outputs", prefix=OUTPUT_PREFIX,
                                 expiration=Duration.days(opts.task_ttl_days)),
                s3.LifecycleRule(id="expire-uploads", prefix=UPLOAD_PREFIX,
                                 expiration=Duration.days(opts.task_ttl_days)),
                s3.LifecycleRule(id="abort-multipart", abort_incomplete_multipart_upload_after=Duration.days(1)),
            ],
            # Browsers upload straight to S3 with the presigned PUT URL and play audio from it: the same
            # origins as the API's (cors_origins), none when it is empty.
            cors=[s3.CorsRule(allowed_methods=[s3.HttpMethods.PUT, s3.HttpMethods.GET],
                              allowed_origins=cors_origins, allowed_headers=["Content-Type"], max_age=3600)]
            if cors_origins else None,
        )

        # -- queue -------------------------------------------------------------------------------
        self.dlq = sqs.Queue(
            self, "TasksDlq",
            retention_period=Duration.days(14),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        suppress(self.dlq, *[(rule, "This is the dead-letter queue; the worker drains it into failed tasks "
                                    "(service/aws/dlq.py).") for rule in ("AwsSolutions-SQS3", "Serverless-SQSRedrivePolicy")])
        self.queue = sqs.Queue(
            self, "TasksQueue",
            # Longer than the worker's lease, which the worker sets per receive and keeps extending.
            visibility_timeout=Duration.seconds(opts.lease_seconds + 60),
            retention_period=Duration.days(4),
            receive_message_wait_time=Duration.seconds(20),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=sqs.DeadLetterQueue(queue=self.dlq, max_receive_count=opts.max_receives),
        )
        # The interactive lane (service/lanes.py): /format_input's LM-only tasks, which a client waits for
        # with the request open; workers read it before the main queue (service/aws/sqs_queue.py). Same
        # lease and redrive as the main queue, into the same DLQ (one drain, one DeadLetters alarm).
        self.interactive_queue = sqs.Queue(
            self, "InteractiveQueue",
            visibility_timeout=Duration.seconds(opts.lease_seconds + 60),
            retention_period=Duration.days(4),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=sqs.DeadLetterQueue(queue=self.dlq, max_receive_count=opts.max_receives),
        )

        # -- API key -----------------------------------------------------------------------------
        if opts.api_key_secret_arn:
            self.api_key = secretsmanager.Secret.from_secret_complete_arn(self, "ApiKey", opts.api_key_secret_arn)
        else:
            self.api_key = secretsmanager.Secret(
                self, "ApiKey",
                description="ACE-Step API key (clients send it as Bearer token)",
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    exclude_punctuation=True, password_length=40),
            )
            suppress(self.api_key, ("AwsSolutions-SMG4", "The API key is handed to clients: an automatic rotation "
                                                         "would lock them out. Rotate it by hand (infra/README.md)."))

        # Signed audio/upload URLs are keyed with their own random secret, never the API key (a
        # shared URL must not let anyone test key guesses). Rotate with put-secret-value: the
        # previous value (AWSPREVIOUS) stays valid until the next rotation.
        self.signing_secret = self._generated_secret(
            "UrlSigningSecret", "ACE-Step: secret for signed audio/upload URLs (not the API key)",
            "Rotated by hand with put-secret-value: the API accepts AWSPREVIOUS, so URLs already handed out keep "
            "working.")
        # Webhooks are signed with a secret of their own (Standard Webhooks), never the API key; receivers
        # get it from GET /v1/webhook_secret. After put-secret-value both values sign until the next one.
        self.webhook_secret = self._generated_secret(
            "WebhookSigningSecret",
            "ACE-Step: secret webhook signatures are keyed with (given to receivers; not the API key)",
            "Receivers hold it: rotated by hand with put-secret-value, after which deliveries carry both signatures.")

        common_env = {
            "ACESTEP_BACKEND": "aws",
            "ACESTEP_TABLE_NAME": self.table.table_name,
            "ACESTEP_QUEUE_URL": self.queue.queue_url,
            "ACESTEP_INTERACTIVE_QUEUE_URL": self.interactive_queue.queue_url,  # the API sends, workers read first
            "ACESTEP_BUCKET": self.bucket.bucket_name,
            "ACESTEP_TASK_TTL_DAYS": str(opts.task_ttl_days),
            "ACESTEP_MAX_RECEIVES": str(opts.max_receives),
            "ACESTEP_CONFIG_PATH": opts.config_path,
            "ACESTEP_WEBHOOK_SECRET_ARN": self.webhook_secret.secret_arn,  # both sign: workers, the API on cancel
        }

        CfnOutput(self, "BucketName", value=self.bucket.bucket_name,
                  description="audio and published weights: acestep-models publish --bucket <this>")
        CfnOutput(self, "TableName", value=self.table.table_name)
        CfnOutput(self, "QueueUrl", value=self.queue.queue_url)
        CfnOutput(self, "DlqUrl", value=self.dlq.queue_url)
        CfnOutput(self, "InteractiveQueueUrl", value=self.interactive_queue.queue_url)

        self.api_function, self.http_api = self._api(opts, common_env)
        edge = self._edge(opts, self.http_api) if opts.cloudfront else None
        # Workers send the webhooks: their file URLs are made absolute under where clients reach the API.
        public_url = f"https://{edge.distribution_domain_name}" if edge is not None else self.http_api.api_endpoint
        self.worker_service = self._workers(opts, {**common_env, "ACESTEP_PUBLIC_BASE_URL": public_url})
        self._wake_workers_on_submit(self.api_function, self.worker_service)
        self._alarms(opts)

    # -- API: HTTP API -> Lambda ------------------------------------------------------------------

    def _generated_secret(self, construct_id: str, description: str, rotation: str) -> secretsmanager.Secret:
        """A 64-character random secret the services key signatures with; `rotation`: why it rotates by hand."""
        secret = secretsmanager.Secret(
            self, construct_id, description=description,
            generate_secret_string=secretsmanager.SecretStringGenerator(exclude_punctuation=True, password_length=64),
        )
        suppress(secret, ("AwsSolutions-SMG4", rotation))
        return secret

    def _api(self, opts: StackOptions, env: dict) -> tuple[lambda_.Function, apigw.HttpApi]:
        api_env = {
            **env,
            "ACESTEP_QUEUE_MAXSIZE": str(opts.queue_maxsize),
            "ACESTEP_AUDIO_URL_TTL": str(opts.audio_url_ttl),
            "ACESTEP_API_KEY_SECRET_ARN": self.api_key.secret_arn,
            # The app answers CORS (preflights included): the one place the allowed origins live.
            "ACESTEP_CORS_ORIGINS": opts.cors_origins,
            "ACESTEP_SIGNING_SECRET_ARN": self.signing_secret.secret_arn,
        }
        log_group = logs.LogGroup(self, "ApiLogs", retention=logs.RetentionDays.ONE_MONTH,
                                  removal_policy=RemovalPolicy.DESTROY)
        # Its own role with only its own log group, rather than the AWS-managed basic execution policy.
        role = iam.Role(self, "ApiFunctionRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                        description="ACE-Step API Lambda")
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="WriteLogs", actions=["logs:CreateLogStream", "logs:PutLogEvents"],
            resources=[log_group.log_group_arn]))
        common = dict(
            role=role,
            memory_size=1024,  # CPU scales with memory: 1 GB keeps the cold start short
            timeout=Duration.seconds(29),  # HTTP API integrations time out at 30 s
            environment=api_env,
            log_group=log_group,
            architecture=lambda_.Architecture.X86_64,
            reserved_concurrent_executions=opts.api_reserved_concurrency or None,
        )
        target: lambda_.IFunction
        if opts.lambda_asset_dir:
            # A zip on a managed Python runtime can use SnapStart: init (imports, app, priming in
            # entrypoints/snapstart.py) runs once per published version, and a cold start restores
            # that snapshot. The gateway must call the version (through an alias), not $LATEST.
            fn = lambda_.Function(
                self, "ApiFunction",
                runtime=_LAMBDA_RUNTIMES[LAMBDA_PYTHON],
                handler="entrypoints.lambda_api.handler",
                code=lambda_.Code.from_asset(opts.lambda_asset_dir),
                snap_start=lambda_.SnapStartConf.ON_PUBLISHED_VERSIONS,
                **common,
            )
            target = lambda_.Alias(self, "ApiLive", alias_name="live", version=fn.current_version)
        else:
            # Container images cannot use SnapStart; their cold start is the whole init.
            fn = lambda_.DockerImageFunction(
                self, "ApiFunction",
                code=lambda_.DockerImageCode.from_image_asset(str(REPO_ROOT), target="lambda"),
                **common,
            )
            target = fn
        self._grant_api(role)
        if opts.lambda_asset_dir:
            suppress(fn, *[(rule, f"Python {LAMBDA_PYTHON} on purpose: the runtime infra/package_lambda.py builds "
                                  "wheels for and the package was verified under (infra/README.md); move both together.")
                           for rule in ("AwsSolutions-L1", "Serverless-LambdaLatestVersion")])
        suppress(fn,
                 ("Serverless-LambdaDLQ", "API Gateway invokes it synchronously: a failed request is answered "
                                          "to its client, and there is no event to dead-letter."),
                 ("Serverless-LambdaTracing", "Every log line carries the request id and the worker publishes EMF "
                                              "metrics; X-Ray would cost per request with nobody reading it."))
        self._suppress_prefix_grants(role)

        # No cors_preflight: the gateway would answer preflights itself with its own origin list and
        # override the app's ACESTEP_CORS_ORIGINS. No default stage: the stage below throttles and logs.
        http_api = apigw.HttpApi(
            self, "HttpApi",
            default_integration=integrations.HttpLambdaIntegration("ApiIntegration", target),
            create_default_stage=False,
        )
        access_logs = logs.LogGroup(self, "ApiAccessLogs", retention=logs.RetentionDays.ONE_MONTH,
                                    removal_policy=RemovalPolicy.DESTROY)
        apigw.HttpStage(
            self, "DefaultStage",
            http_api=http_api,
            stage_name="$default",
            auto_deploy=True,
            throttle=apigw.ThrottleSettings(rate_limit=opts.api_rate_limit, burst_limit=opts.api_burst_limit),
            access_log_settings=_AccessLogs(apigw.LogGroupLogDestination(access_logs),
                                            apigw_v1.AccessLogFormat.custom(ACCESS_LOG_FORMAT)),
        )
        # The app checks the API key (header or the upstream body field `ai_token`, and signed audio
        # URLs without either): a gateway authorizer on the header would refuse valid requests.
        for route in http_api.node.find_all():
            if isinstance(route, apigw.CfnRoute):
                suppress(route,
                         ("AwsSolutions-APIG4", "Authorization is in the app: the API key may come in the header or "
                                                "the upstream-compatible body field `ai_token`, and /v1/audio URLs "
                                                "carry a signature instead; infra/README.md (Edge) explains why."))
        CfnOutput(self, "ApiLogGroup", value=log_group.log_group_name)
        CfnOutput(self, "ApiAccessLogGroup", value=access_logs.log_group_name)
        CfnOutput(self, "ApiUrl", value=http_api.api_endpoint)
        CfnOutput(self, "ApiKeySecretArn", value=self.api_key.secret_arn)
        return fn, http_api

    def _suppress_prefix_grants(self, role: iam.IConstruct) -> None:
        """The wildcards in the roles' grants are object prefixes and the table's indexes, never whole services."""
        bucket = f"<{self.get_logical_id(self.bucket.node.default_child)}.Arn>"
        table = f"<{self.get_logical_id(self.table.node.default_child)}.Arn>"
        reasons = {
            f"{bucket}/{OUTPUT_PREFIX}*": "Result files: keys are made per task and attempt at run time.",
            f"{bucket}/{UPLOAD_PREFIX}*": "Uploaded sources: keys are made per upload at run time.",
            f"{bucket}/{MODELS_PREFIX}*": "Published model weights (acestep-models publish), read only.",
            f"{bucket}/{ADAPTERS_PREFIX}*": "Uploaded LoRA/LoKr adapters: keys are their sha256, made at upload.",
            f"{table}/index/*": "The task table's own indexes (service/aws/schema.py).",
        }
        suppress(role, *[(f"AwsSolutions-IAM5[Resource::{resource}]", reason) for resource, reason in reasons.items()])

    def _grant_api(self, role: iam.IRole) -> None:
        """Submit/poll/serve only: no Scan, no queue receive, S3 writes only under uploads/.

        Every grant here is needed by a call the API makes: tests/test_aws_e2e.py runs it with only these
        statements and checks its calls against them (tests/iam_support.py, which lists the exceptions)."""
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskTable",  # items only (transactions are authorized per item); DeleteItem: a stale idempotency key
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem",
                     "dynamodb:DeleteItem"],
            resources=[self.table.table_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskIndexes",  # queue positions and listings read the indexes, never the table
            actions=["dynamodb:Query"],
            resources=[f"{self.table.table_arn}/index/*"],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="EnqueueTasks",
            actions=["sqs:SendMessage", "sqs:GetQueueAttributes"],
            resources=[self.queue.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="EnqueueInteractiveTasks",  # /format_input's task, to the interactive lane
            actions=["sqs:SendMessage"],
            resources=[self.interactive_queue.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadAudio",  # HeadObject and the presigned GET both need GetObject
            actions=["s3:GetObject"],
            resources=[self.bucket.arn_for_objects(OUTPUT_PREFIX + "*"),
                       self.bucket.arn_for_objects(UPLOAD_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="StoreAdapters",  # POST /v1/adapters keeps a checked upload under its sha256; DELETE removes it
            actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            resources=[self.bucket.arn_for_objects(ADAPTERS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="WriteUploads",  # multipart uploads, presigned PUTs, and undoing a refused submit
            actions=["s3:PutObject", "s3:DeleteObject"],
            resources=[self.bucket.arn_for_objects(UPLOAD_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ApiKey",
            actions=["secretsmanager:GetSecretValue"],
            resources=[self.api_key.secret_arn, self.signing_secret.secret_arn, self.webhook_secret.secret_arn],
        ))

    # -- workers: ECS on GPU instances --------------------------------------------------------------

    def _workers(self, opts: StackOptions, env: dict) -> ecs.Ec2Service:
        # Public subnets and no NAT gateway (about $32/month each): workers reach AWS over the
        # internet gateway, and S3/DynamoDB over free gateway endpoints.
        vpc = ec2.Vpc(
            self, "Vpc", max_azs=2, nat_gateways=0,
            subnet_configuration=[ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC)],
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3),
                "DynamoDB": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.DYNAMODB),
            },
        )
        # Flow logs to the access-log bucket (S3 delivery: no log-group ingestion charge).
        vpc.add_flow_log("FlowLogs", destination=ec2.FlowLogDestination.to_s3(self.log_bucket, "vpc-flow-logs/"))
        cluster = ecs.Cluster(self, "Cluster", vpc=vpc, container_insights_v2=ecs.ContainerInsights.ENABLED)
        security_group = ec2.SecurityGroup(self, "WorkerSg", vpc=vpc, allow_all_outbound=True,
                                           description="ACE-Step GPU workers: no inbound traffic")
        asg = self._gpu_instances(opts, vpc, security_group)
        # The worker runs as uid 1000 (Dockerfile): give it the host's weights cache directory.
        asg.add_user_data("mkdir -p /opt/acestep/checkpoints", "chown 1000:1000 /opt/acestep/checkpoints")
        capacity = ecs.AsgCapacityProvider(
            self, "GpuCapacity",
            auto_scaling_group=asg,
            enable_managed_scaling=True,
            target_capacity_percent=100,
            # ECS terminates an instance only once its tasks are gone, and drains it first, so a
            # protected task (below) is never cut off by the instance group shrinking.
            enable_managed_termination_protection=True,
            enable_managed_draining=True,
        )
        # Spot: the two-minute interruption notice drains the instance (ECS_ENABLE_SPOT_INSTANCE_DRAINING),
        # so the worker gets SIGTERM and releases its task in time (--grace-seconds below). CDK's own switch
        # (spot_instance_draining) looks at the group's spot_price, which a mixed-instances group has not.
        cluster.add_asg_capacity_provider(capacity)
        if opts.spot_max_price:
            asg.add_user_data("echo ECS_ENABLE_SPOT_INSTANCE_DRAINING=true >> /etc/ecs/ecs.config")

        task_def = ecs.Ec2TaskDefinition(self, "WorkerTask")
        # Weights are cached on the instance, not baked into the image: a restarted task on the same
        # host skips the download.
        task_def.add_volume(name="checkpoints", host=ecs.Host(source_path="/opt/acestep/checkpoints"))
        self.worker_logs = logs.LogGroup(self, "WorkerLogs", retention=logs.RetentionDays.ONE_MONTH,
                                         removal_policy=RemovalPolicy.DESTROY)
        container = task_def.add_container(
            "worker",
            image=self._worker_image(opts),
            gpu_count=1,
            memory_reservation_mib=12 * 1024,
            # ECS waits stop_timeout after SIGTERM before SIGKILL; the worker releases an unfinished
            # task before that (grace period below) so another worker picks it up at once.
            stop_timeout=Duration.seconds(120),
            command=["--backend", "aws", "--grace-seconds", "100", "--heartbeat-file", HEARTBEAT_FILE],
            # Unhealthy when the heartbeats stop or a running task reports no progress for
            # ACESTEP_STALL_TIMEOUT: ECS replaces the task even if the process cannot exit by itself.
            health_check=ecs.HealthCheck(
                command=["CMD", "acestep-worker", "--healthcheck", "--heartbeat-file", HEARTBEAT_FILE],
                interval=Duration.seconds(30), timeout=Duration.seconds(10), retries=3,
                start_period=Duration.seconds(300)),
            environment={
                **env,
                "ACESTEP_DLQ_URL": self.dlq.queue_url,
                "ACESTEP_VISIBILITY_TIMEOUT": str(opts.lease_seconds),
                "ACESTEP_CHECKPOINT_DIR": "/checkpoints",
                "ACESTEP_ALLOW_DOWNLOAD": "true",
                "ACESTEP_DEMO_IF_MISSING": "false",
                # from the stack's bucket (fast, in-region) before the public hub (the fallback)
                "ACESTEP_MODELS_MIRROR": "true",
            },
            logging=ecs.LogDrivers.aws_logs(stream_prefix="worker", log_group=self.worker_logs),
        )
        container.add_mount_points(ecs.MountPoint(container_path="/checkpoints", source_volume="checkpoints",
                                                  read_only=False))
        self._grant_worker(task_def.task_role, cluster)
        self._suppress_prefix_grants(task_def.task_role)
        suppress(task_def.task_role, (
            f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ecs:{self._nag_value(self.region, 'AWS::Region')}:"
            f"{self._nag_value(self.account, 'AWS::AccountId')}:task/<{self.get_logical_id(cluster.node.default_child)}>/*]",
            "Scale-in protection of the worker's own task, whose id is only known at run time; limited to "
            "this cluster's tasks."))
        if task_def.execution_role is not None:  # made by an ECR image (asset or private repository): pulls it
            suppress(task_def.execution_role, (
                "AwsSolutions-IAM5[Resource::*]",
                "ecr:GetAuthorizationToken only: AWS defines no resource for it (a registry login); the image "
                "pull itself (ecr:BatchGetImage, ecr:GetDownloadUrlForLayer) is granted on the one repository."))
        suppress(task_def, ("AwsSolutions-ECS2", "Plain settings (names, limits, flags), no secrets: the worker "
                                                 "needs no API key, and a hub token would come from Secrets Manager."))
        service = ecs.Ec2Service(
            self, "Workers",
            cluster=cluster,
            task_definition=task_def,
            desired_count=0,
            min_healthy_percent=0,
            max_healthy_percent=100,
            capacity_provider_strategies=[ecs.CapacityProviderStrategy(
                capacity_provider=capacity.capacity_provider_name, weight=1)],
            circuit_breaker=ecs.DeploymentCircuitBreaker(rollback=True),
        )
        scaling = service.auto_scale_task_count(min_capacity=0, max_capacity=opts.max_workers)
        scaling.scale_on_metric(
            "BacklogPerWorker",
            metric=self.backlog_metric(),
            scaling_steps=backlog_steps(opts.backlog_per_worker, opts.max_workers),
            adjustment_type=appscaling.AdjustmentType.EXACT_CAPACITY,
            cooldown=Duration.seconds(60),
            evaluation_periods=1,
        )
        self._alarm_when_tasks_cannot_start(cluster, service, asg)
        self.cluster, self.gpu_instances = cluster, asg
        CfnOutput(self, "ClusterName", value=cluster.cluster_name)
        CfnOutput(self, "WorkerServiceName", value=service.service_name)
        CfnOutput(self, "WorkerLogGroup", value=self.worker_logs.log_group_name)
        CfnOutput(self, "GpuInstanceGroupName", value=asg.auto_scaling_group_name)
        return service

    @staticmethod
    def _nag_value(value: str, pseudo: str) -> str:
        """How cdk-nag writes the stack's account or region in a rule id: the value, or `<AWS::AccountId>`
        when the stack is environment-agnostic (synth without credentials)."""
        return f"<{pseudo}>" if Token.is_unresolved(value) else value

    def _worker_image(self, opts: StackOptions) -> ecs.ContainerImage:
        """The Dockerfile's `worker` target built at deploy time (default), a private ECR image (pull granted on
        its repository), or any other registry's image (pulled without credentials)."""
        if not opts.worker_image:
            return ecs.ContainerImage.from_asset(str(REPO_ROOT), target="worker")
        ecr_image = parse_ecr_image(opts.worker_image)
        if ecr_image is None:
            return ecs.ContainerImage.from_registry(opts.worker_image)
        repository = ecr.Repository.from_repository_attributes(
            self, "WorkerRepository", repository_name=ecr_image["name"],
            repository_arn=f"arn:{_partition_of(ecr_image['region'])}:ecr:{ecr_image['region']}:"
                           f"{ecr_image['account']}:repository/{ecr_image['name']}")
        return ecs.ContainerImage.from_ecr_repository(repository, tag=ecr_image["tag"])

    def _gpu_instances(self, opts: StackOptions, vpc: ec2.IVpc,
                       security_group: ec2.ISecurityGroup) -> autoscaling.AutoScalingGroup:
        """The GPU instance group: one instance type on demand, or several spot pools (spot_max_price)."""
        spot_types = list(dict.fromkeys(
            [opts.instance_type, *(t.strip() for t in opts.spot_instance_types.split(",") if t.strip())]))
        instance_role = iam.Role(self, "GpuInstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
                                 description="ACE-Step GPU instances: the ECS agent")
        launch_template = ec2.LaunchTemplate(
            self, "GpuLaunchTemplate",
            # Amazon Linux 2023 ECS GPU AMI (NVIDIA driver + container toolkit), newest on each deploy.
            machine_image=ecs.EcsOptimizedImage.amazon_linux2023(ecs.AmiHardwareType.GPU),
            # on spot, the types come from the mixed-instances policy below
            instance_type=None if opts.spot_max_price else ec2.InstanceType(opts.instance_type),
            user_data=ec2.UserData.for_linux(),
            role=instance_role,
            security_group=security_group,
            associate_public_ip_address=True,
            require_imdsv2=True,
            block_devices=[ec2.BlockDevice(
                device_name="/dev/xvda",
                # Room for the image (~10 GB) and the model weights cache (~10-20 GB).
                volume=ec2.BlockDeviceVolume.ebs(120, volume_type=ec2.EbsDeviceVolumeType.GP3, encrypted=True))],
        )
        placement = dict(
            vpc=vpc, vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            min_capacity=0, max_capacity=opts.max_workers,
            # one-minute instance counts for the dashboard (free)
            group_metrics=[autoscaling.GroupMetrics.all()],
        )
        if opts.spot_max_price:
            asg = autoscaling.AutoScalingGroup(
                self, "GpuInstances",
                mixed_instances_policy=autoscaling.MixedInstancesPolicy(
                    launch_template=launch_template,
                    launch_template_overrides=[autoscaling.LaunchTemplateOverrides(instance_type=ec2.InstanceType(t))
                                               for t in spot_types],
                    instances_distribution=autoscaling.InstancesDistribution(
                        on_demand_base_capacity=0, on_demand_percentage_above_base_capacity=0,
                        # the pools least likely to be interrupted, among the cheapest
                        spot_allocation_strategy=autoscaling.SpotAllocationStrategy.PRICE_CAPACITY_OPTIMIZED,
                        spot_max_price=opts.spot_max_price)),
                **placement)
            suppress(asg, ("AwsSolutions-EC26", "The volume is encrypted in the launch template (encrypted gp3, "
                                                "checked by tests/test_infra.py); the rule cannot read a launch "
                                                "template through a mixed-instances policy and errors."))
        else:
            asg = autoscaling.AutoScalingGroup(self, "GpuInstances", launch_template=launch_template, **placement)
        suppress(asg, ("AwsSolutions-AS3", "Scaling is routine here (to zero after every burst): a notice per event "
                                           "would be noise. The alarms (TasksCannotStart, OldestTask, DeadLetters) "
                                           "report what needs a person."))
        suppress(instance_role,
                 ("AwsSolutions-IAM5[Action::ecs:Submit*]", "The ECS agent's instance policy as CDK writes it."),
                 ("AwsSolutions-IAM5[Resource::*]", "The ECS agent's instance policy as CDK writes it: "
                                                    "ecs:DiscoverPollEndpoint and ecr:GetAuthorizationToken "
                                                    "take no resource."))
        return asg

    def _alarm_when_tasks_cannot_start(self, cluster: ecs.ICluster, service: ecs.Ec2Service,
                                       asg: autoscaling.AutoScalingGroup) -> None:
        """Minutes, not OldestTask's half hour: EventBridge rules on the events that say the workers cannot
        start (a stopped task's reason, the service scheduler's warnings, the instance group failing to launch)
        write each event to a log group (what happened, verbatim) and count it; the alarm fires on the count."""
        # EventBridge writes to log groups under /aws/events/, allowed by a resource policy (the CDK target
        # would install that policy through a custom-resource Lambda; the native resource does it).
        self.task_failure_events = logs.LogGroup(
            self, "TaskStartFailureEvents", log_group_name=f"/aws/events/{self.stack_name}-task-start-failures",
            retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY)
        logs.ResourcePolicy(self, "TaskStartFailureEventsPolicy", policy_statements=[iam.PolicyStatement(
            principals=[iam.ServicePrincipal("events.amazonaws.com"), iam.ServicePrincipal("delivery.logs.amazonaws.com")],
            actions=["logs:CreateLogStream", "logs:PutLogEvents"],
            resources=[self.task_failure_events.log_group_arn])])
        target = _LogGroupTarget(self.format_arn(service="logs", resource="log-group",
                                                 arn_format=ArnFormat.COLON_RESOURCE_NAME,
                                                 resource_name=self.task_failure_events.log_group_name))
        patterns = {
            "StoppedBeforeWorking": events.EventPattern(
                source=["aws.ecs"], detail_type=["ECS Task State Change"],
                detail={"clusterArn": [cluster.cluster_arn], "lastStatus": ["STOPPED"],
                        "$or": [{"stopCode": TASK_START_FAILURE_CODES},
                                {"stoppedReason": [{"prefix": reason} for reason in TASK_START_FAILURE_REASONS]}]}),
            "ServiceCannotPlace": events.EventPattern(
                source=["aws.ecs"], detail_type=["ECS Service Action"], resources=[service.service_arn],
                detail={"eventName": SERVICE_START_FAILURE_EVENTS}),
            "InstanceLaunchFailed": events.EventPattern(  # GPU quota, no spot capacity in any pool
                source=["aws.autoscaling"], detail_type=["EC2 Instance Launch Unsuccessful"],
                detail={"AutoScalingGroupName": [asg.auto_scaling_group_name]}),
        }
        counts = {}
        for name, pattern in patterns.items():
            rule = events.Rule(self, f"TaskStart{name}", event_pattern=pattern,
                               description=f"ACE-Step workers cannot start: {name}",
                               targets=[target])
            suppress(rule, ("Serverless-EventBusDLQ", "The alarm counts the rule's matches (TriggeredRules), not "
                                                      "deliveries: an event lost on its way to the log group still "
                                                      "raises TasksCannotStart."))
            counts[name[0].lower() + name[1:]] = cloudwatch.Metric(
                namespace="AWS/Events", metric_name="TriggeredRules", dimensions_map={"RuleName": rule.rule_name},
                statistic="Sum", period=Duration.minutes(1))
        self.tasks_cannot_start = cloudwatch.Alarm(
            self, "TasksCannotStart",
            alarm_description="Workers cannot start: a task stopped before working (image pull, start-up, the "
                              "worker exiting or failing its health check), ECS cannot place tasks, or no GPU "
                              "instance can launch (quota, spot capacity). The events are in the "
                              "TaskStartFailureEvents log group (stack output TaskStartFailureLogGroup).",
            metric=cloudwatch.MathExpression(expression=" + ".join(f"FILL({k}, 0)" for k in counts),
                                             using_metrics=counts, period=Duration.minutes(1),
                                             label="Events saying workers cannot start"),
            threshold=1, evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        CfnOutput(self, "TaskStartFailureLogGroup", value=self.task_failure_events.log_group_name)

    def backlog_metric(self) -> cloudwatch.IMetric:
        """Tasks waiting plus tasks running, in both lanes: scale-in never drops below the work in hand."""
        period = Duration.minutes(1)
        lane = self.interactive_queue
        return cloudwatch.MathExpression(
            expression="waiting + running + lanewaiting + lanerunning",
            using_metrics={
                "waiting": self.queue.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum"),
                "running": self.queue.metric_approximate_number_of_messages_not_visible(period=period, statistic="Maximum"),
                "lanewaiting": lane.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum"),
                "lanerunning": lane.metric_approximate_number_of_messages_not_visible(period=period, statistic="Maximum"),
            },
            period=period,
            label="Backlog (waiting + running tasks)",
        )

    def _grant_worker(self, role: iam.IRole, cluster: ecs.ICluster) -> None:
        """Lease/finish tasks, read inputs, write outputs, drain the DLQ. No API key: workers do not need it.

        Proven as for the API (_grant_api): tests/test_aws_e2e.py runs workers with only these statements."""
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="SignWebhooks",
            actions=["secretsmanager:GetSecretValue"],
            resources=[self.webhook_secret.secret_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="LeaseTasks",  # send: a task given back (shutdown) or a dead letter that never ran is sent again
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                     "sqs:GetQueueAttributes", "sqs:SendMessage"],
            resources=[self.queue.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="LeaseInteractiveTasks",  # send: as on the main queue, a give-back or a never-run dead letter
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:SendMessage"],
            resources=[self.interactive_queue.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="DrainDeadLetters",  # send: a given-back task past max_receives is dead-lettered by the worker
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:SendMessage"],
            resources=[self.dlq.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskTable",  # items only: transactions are authorized per item; metas: conditional updates
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"],
            resources=[self.table.table_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskIndexes",
            actions=["dynamodb:Query"],
            resources=[f"{self.table.table_arn}/index/*"],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadInputs",
            actions=["s3:GetObject"],
            resources=[self.bucket.arn_for_objects(UPLOAD_PREFIX + "*"),
                       self.bucket.arn_for_objects(OUTPUT_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="WriteOutputs",  # delete: a fenced-out duplicate attempt removes its own files
            actions=["s3:PutObject", "s3:DeleteObject"],
            resources=[self.bucket.arn_for_objects(OUTPUT_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadModelMirror",  # weights published once with `acestep-models publish`; uploaded adapters
            actions=["s3:GetObject"],
            resources=[self.bucket.arn_for_objects(MODELS_PREFIX + "*"), self.bucket.arn_for_objects(ADAPTERS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ScaleInProtection",  # through the ECS agent (service/aws/task_protection.py)
            actions=["ecs:UpdateTaskProtection"],
            resources=[self.format_arn(service="ecs", resource="task", resource_name=f"{cluster.cluster_name}/*")],
        ))

    def _wake_workers_on_submit(self, fn: lambda_.Function, service: ecs.Ec2Service) -> None:
        """Scale from zero: the API starts the worker service when a task arrives and it runs none."""
        fn.add_environment("ACESTEP_ECS_CLUSTER", service.cluster.cluster_name)
        fn.add_environment("ACESTEP_ECS_SERVICE", service.service_name)
        fn.role.add_to_principal_policy(iam.PolicyStatement(
            sid="WakeWorkers",
            actions=["ecs:DescribeServices", "ecs:UpdateService"],
            resources=[service.service_arn],
        ))

    # -- edge: CloudFront + WAF in front of the HTTP API (optional) --------------------------------

    def _edge(self, opts: StackOptions, http_api: apigw.HttpApi) -> cloudfront.Distribution:
        web_acl_arn = opts.waf_web_acl_arn or self._web_acl(opts).attr_arn
        # Authorization is part of the cache key only so that CloudFront forwards it on GET; with a
        # 0 s default TTL and the origin sending no Cache-Control, nothing is served from cache.
        no_cache = cloudfront.CachePolicy(
            self, "ApiPassThrough",
            default_ttl=Duration.seconds(0), min_ttl=Duration.seconds(0), max_ttl=Duration.seconds(1),
            header_behavior=cloudfront.CacheHeaderBehavior.allow_list("Authorization"),
            query_string_behavior=cloudfront.CacheQueryStringBehavior.all(),
            cookie_behavior=cloudfront.CacheCookieBehavior.none(),
        )
        distribution = cloudfront.Distribution(
            self, "Edge",
            default_behavior=cloudfront.BehaviorOptions(
                origin=origins.HttpOrigin(Fn.select(2, Fn.split("/", http_api.api_endpoint)),
                                          protocol_policy=cloudfront.OriginProtocolPolicy.HTTPS_ONLY),
                allowed_methods=cloudfront.AllowedMethods.ALLOW_ALL,
                viewer_protocol_policy=cloudfront.ViewerProtocolPolicy.HTTPS_ONLY,
                cache_policy=no_cache,
                origin_request_policy=cloudfront.OriginRequestPolicy.ALL_VIEWER_EXCEPT_HOST_HEADER,
            ),
            web_acl_id=web_acl_arn,
            minimum_protocol_version=cloudfront.SecurityPolicyProtocol.TLS_V1_2_2021,
            enable_logging=True,
            log_bucket=self.log_bucket,
            log_file_prefix="cloudfront/",
        )
        suppress(distribution,
                 ("AwsSolutions-CFR1", "No geo restriction: the service has no regional licensing limits."),
                 ("AwsSolutions-CFR4", "Viewers get TLS 1.2+ on the default *.cloudfront.net certificate; "
                                       "this rule flags that certificate whatever the minimum version."))
        CfnOutput(self, "EdgeUrl", value=f"https://{distribution.distribution_domain_name}")
        return distribution

    def _web_acl(self, opts: StackOptions) -> wafv2.CfnWebACL:
        if Token.is_unresolved(self.region) or self.region != "us-east-1":
            raise ValueError("cloudfront=true creates its WAF web ACL in us-east-1 (CloudFront's WAF region): "
                             "deploy the stack there, or pass waf_web_acl_arn=<an existing CLOUDFRONT-scope ACL>")

        def visibility(name: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
            return wafv2.CfnWebACL.VisibilityConfigProperty(
                cloud_watch_metrics_enabled=True, metric_name=name, sampled_requests_enabled=True)

        def managed(priority: int, name: str, overrides: tuple[str, ...] = ()) -> wafv2.CfnWebACL.RuleProperty:
            return wafv2.CfnWebACL.RuleProperty(
                name=name, priority=priority, override_action=wafv2.CfnWebACL.OverrideActionProperty(none={}),
                statement=wafv2.CfnWebACL.StatementProperty(
                    managed_rule_group_statement=wafv2.CfnWebACL.ManagedRuleGroupStatementProperty(
                        vendor_name="AWS", name=name,
                        rule_action_overrides=[wafv2.CfnWebACL.RuleActionOverrideProperty(
                            name=rule, action_to_use=wafv2.CfnWebACL.RuleActionProperty(count={}))
                            for rule in overrides] or None)),
                visibility_config=visibility(name))

        return wafv2.CfnWebACL(
            self, "EdgeAcl",
            scope="CLOUDFRONT",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            visibility_config=visibility("acestep-edge"),
            rules=[
                wafv2.CfnWebACL.RuleProperty(
                    name="RatePerIp", priority=0, action=wafv2.CfnWebACL.RuleActionProperty(block={}),
                    statement=wafv2.CfnWebACL.StatementProperty(
                        rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                            limit=opts.waf_rate_limit, aggregate_key_type="IP")),
                    visibility_config=visibility("RatePerIp")),
                # Upload bodies (multipart audio, up to Lambda's 6 MB) exceed the set's 8 KB body rule.
                managed(1, "AWSManagedRulesCommonRuleSet", overrides=("SizeRestrictions_BODY",)),
                managed(2, "AWSManagedRulesKnownBadInputsRuleSet"),
            ],
        )

    # -- alarms -----------------------------------------------------------------------------------

    def _alarms(self, opts: StackOptions) -> None:
        topic = sns.Topic(self, "Alarms", display_name="ACE-Step alarms", enforce_ssl=True)
        suppress(topic, ("AwsSolutions-SNS2", "Alarm notifications carry no task data; CloudWatch cannot publish "
                                              "to a topic under the AWS-managed SNS key, and a customer key costs "
                                              "$1/month for no gain here."))
        if opts.alarm_email:
            topic.add_subscription(subscriptions.EmailSubscription(opts.alarm_email))
        action = cw_actions.SnsAction(topic)
        alarms = [
            cloudwatch.Alarm(
                self, "DeadLetters",
                alarm_description="Tasks were dead-lettered (their workers kept dying); they read as failed",
                metric=self.dlq.metric_approximate_number_of_messages_visible(period=Duration.minutes(1),
                                                                              statistic="Maximum"),
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            cloudwatch.Alarm(
                self, "OldestTask",
                alarm_description="A task has waited too long: workers are not keeping up or not starting",
                metric=self.queue.metric_approximate_age_of_oldest_message(period=Duration.minutes(1),
                                                                           statistic="Maximum"),
                threshold=opts.oldest_message_alarm_seconds, evaluation_periods=3,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            cloudwatch.Alarm(
                self, "OldestInteractiveTask",
                alarm_description="An interactive task (/format_input) has waited too long: no worker reads the lane",
                metric=self.interactive_queue.metric_approximate_age_of_oldest_message(period=Duration.minutes(1),
                                                                                       statistic="Maximum"),
                threshold=opts.oldest_message_alarm_seconds, evaluation_periods=3,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            cloudwatch.Alarm(
                self, "WorkerCannotLoadModel",
                alarm_description="A GPU worker is up but could not load its models; it fails waiting tasks with "
                                  "the cause, which /health and the worker log (WorkerLoadFailures) name",
                metric=cloudwatch.Metric(namespace=METRICS_NAMESPACE, metric_name="WorkerLoadFailures",
                                         dimensions_map={"service": "worker"}, period=Duration.minutes(5),
                                         statistic="Sum"),
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            self.tasks_cannot_start,
            cloudwatch.Alarm(
                self, "ApiErrors",
                alarm_description="The API Lambda raised errors",
                metric=self.api_function.metric_errors(period=Duration.minutes(5), statistic="Sum"),
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        ]
        for alarm in alarms:
            alarm.add_alarm_action(action)
        CfnOutput(self, "AlarmTopicArn", value=topic.topic_arn)
        self._dashboard(alarms)

    def _dashboard(self, alarms: list[cloudwatch.Alarm]) -> None:
        """One page for an operator: the queue, the workers, the API and the alarms."""
        minute = Duration.minutes(1)
        cluster, service = self.cluster.cluster_name, self.worker_service.service_name

        def insights(metric: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(namespace="ECS/ContainerInsights", metric_name=metric, label=label,
                                     dimensions_map={"ClusterName": cluster, "ServiceName": service},
                                     statistic="Average", period=minute)

        def worker_metric(name: str, statistic: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(namespace=METRICS_NAMESPACE, metric_name=name, label=label,
                                     dimensions_map={"service": "worker"}, statistic=statistic, period=minute)

        def graph(title: str, *metrics: cloudwatch.IMetric, right: tuple = ()) -> cloudwatch.GraphWidget:
            return cloudwatch.GraphWidget(title=title, left=list(metrics), right=list(right), width=8, height=6)

        queue, dlq, fn, api = self.queue, self.dlq, self.api_function, self.http_api
        dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.hours(3))
        dashboard.add_widgets(cloudwatch.AlarmStatusWidget(title="Alarms", alarms=alarms, width=24, height=3))
        dashboard.add_widgets(
            graph("Queue: waiting and running tasks",
                  queue.metric_approximate_number_of_messages_visible(period=minute, statistic="Maximum",
                                                                      label="waiting"),
                  queue.metric_approximate_number_of_messages_not_visible(period=minute, statistic="Maximum",
                                                                          label="running"),
                  self.interactive_queue.metric_approximate_number_of_messages_visible(
                      period=minute, statistic="Maximum", label="interactive waiting")),
            graph("Oldest waiting task (s)",
                  queue.metric_approximate_age_of_oldest_message(period=minute, statistic="Maximum", label="age")),
            graph("Dead-lettered tasks",
                  dlq.metric_approximate_number_of_messages_visible(period=minute, statistic="Maximum",
                                                                    label="in the DLQ")),
        )
        dashboard.add_widgets(
            graph("Worker tasks by status",
                  insights("DesiredTaskCount", "desired"), insights("PendingTaskCount", "pending"),
                  insights("RunningTaskCount", "running")),
            graph("GPU instances",
                  cloudwatch.Metric(namespace="AWS/AutoScaling", metric_name="GroupInServiceInstances",
                                    dimensions_map={"AutoScalingGroupName": self.gpu_instances.auto_scaling_group_name},
                                    statistic="Maximum", period=minute, label="in service"),
                  cloudwatch.Metric(namespace="AWS/AutoScaling", metric_name="GroupPendingInstances",
                                    dimensions_map={"AutoScalingGroupName": self.gpu_instances.auto_scaling_group_name},
                                    statistic="Maximum", period=minute, label="starting")),
            graph("Finished tasks and run time",
                  worker_metric("TasksSucceeded", "Sum", "succeeded"), worker_metric("TasksFailed", "Sum", "failed"),
                  right=(worker_metric("RunSeconds", "p50", "run p50 (s)"),
                         worker_metric("RunSeconds", "p95", "run p95 (s)"),
                         worker_metric("QueueWaitSeconds", "p95", "queue wait p95 (s)"))),
        )
        dashboard.add_widgets(
            graph("API requests and errors",
                  api.metric_count(period=minute, statistic="Sum", label="requests"),
                  api.metric_client_error(period=minute, statistic="Sum", label="4xx"),
                  api.metric_server_error(period=minute, statistic="Sum", label="5xx"),
                  fn.metric_errors(period=minute, statistic="Sum", label="Lambda errors"),
                  fn.metric_throttles(period=minute, statistic="Sum", label="Lambda throttles")),
            graph("API latency (ms)",
                  api.metric_latency(period=minute, statistic="p50", label="p50"),
                  api.metric_latency(period=minute, statistic="p99", label="p99"),
                  api.metric_integration_latency(period=minute, statistic="p99", label="Lambda p99")),
            graph("Events saying workers cannot start", self.tasks_cannot_start.metric),
        )
        CfnOutput(self, "DashboardName", value=dashboard.dashboard_name)


def workers_for_backlog(backlog: int, backlog_per_worker: int, max_workers: int) -> int:
    """What the scaling steps compute, as plain arithmetic (documented in infra/README.md)."""
    return min(max_workers, math.ceil(max(0, backlog) / backlog_per_worker))


@jsii.implements(events.IRuleTarget)
class _LogGroupTarget:
    """An EventBridge target that is a log group, by its ARN (the policy allowing it is the stack's own)."""

    def __init__(self, arn: str):
        self._arn = arn

    def bind(self, rule: events.IRule, id: Optional[str] = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self._arn)


@jsii.implements(apigw.IAccessLogSettings)
class _AccessLogs:
    """Where and how the HTTP API stage writes access logs (IAccessLogSettings has no struct form)."""

    def __init__(self, destination: apigw.IAccessLogDestination, log_format: apigw_v1.AccessLogFormat):
        self._destination, self._format = destination, log_format

    @property
    def destination(self) -> apigw.IAccessLogDestination:
        return self._destination

    @property
    def format(self) -> apigw_v1.AccessLogFormat:
        return self._format

"""The API: the Lambda (zip with SnapStart, or the Dockerfile's image), its role, and the HTTP API in front."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jsii
from aws_cdk import CfnOutput, Duration, RemovalPolicy, aws_apigateway as apigw_v1, aws_apigatewayv2 as apigw
from aws_cdk import aws_apigatewayv2_integrations as integrations, aws_ecs as ecs, aws_iam as iam
from aws_cdk import aws_lambda as lambda_, aws_logs as logs
from constructs import Construct

from infra.sections.data import DataResources
from infra.sections.logical_ids import Section
from infra.sections.queues import TaskQueues
from infra.nag import suppress
from infra.options import StackOptions
from infra.package_lambda import LAMBDA_PYTHON
from service.blob_keys import ADAPTERS_PREFIX, OUTPUTS_PREFIX, UPLOADS_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[2]
# The API zip's runtime, by the Python version infra/package_lambda.py builds for (3.12+ has SnapStart).
_LAMBDA_RUNTIMES = {"3.12": lambda_.Runtime.PYTHON_3_12, "3.13": lambda_.Runtime.PYTHON_3_13}
# The fields of one access-log line of the HTTP API (JSON, one object per request).
ACCESS_LOG_FORMAT = json.dumps({
    "requestId": "$context.requestId", "ip": "$context.identity.sourceIp", "time": "$context.requestTime",
    "method": "$context.httpMethod", "path": "$context.path", "status": "$context.status",
    "bytes": "$context.responseLength", "latencyMs": "$context.responseLatency",
    "integrationLatencyMs": "$context.integrationLatency", "error": "$context.integrationErrorMessage",
    "userAgent": "$context.identity.userAgent",
})


@dataclass(frozen=True)
class ApiProps:
    options: StackOptions
    data: DataResources
    queues: TaskQueues
    environment: dict[str, str]  # what the API and the workers both read (the stack's service_environment)


class Api(Section):
    """HTTP API -> Lambda. The role holds exactly the calls the API makes (tests/iam_support.py proves it)."""

    def __init__(self, scope: Construct, construct_id: str, props: ApiProps):
        super().__init__(scope, construct_id)
        opts, data = props.options, props.data
        log_group, target = self._function(props)
        access_logs = self._gateway(opts, target)
        CfnOutput(self, "ApiLogGroup", value=log_group.log_group_name)
        CfnOutput(self, "ApiAccessLogGroup", value=access_logs.log_group_name)
        CfnOutput(self, "ApiUrl", value=self.http_api.api_endpoint)
        CfnOutput(self, "ApiKeySecretArn", value=data.api_key.secret_arn)

    def _function(self, props: ApiProps) -> tuple[logs.LogGroup, lambda_.IFunction]:
        """The API's Lambda function, its own role and log group; returns the log group and what the
        gateway calls (SnapStart's alias for a zip, the function itself for an image)."""
        opts, data = props.options, props.data
        api_env = {
            **props.environment,
            "ACESTEP_QUEUE_MAXSIZE": str(opts.queue_maxsize),
            "ACESTEP_AUDIO_URL_TTL": str(opts.audio_url_ttl),
            "ACESTEP_API_KEY_SECRET_ARN": data.api_key.secret_arn,
            # The app answers CORS (preflights included): the one place the allowed origins live.
            "ACESTEP_CORS_ORIGINS": opts.cors_origins,
            "ACESTEP_SIGNING_SECRET_ARN": data.signing_secret.secret_arn,
        }
        log_group = logs.LogGroup(self, "ApiLogs", retention=logs.RetentionDays.ONE_MONTH,
                                  removal_policy=RemovalPolicy.DESTROY)
        # Its own role with only its own log group, rather than the AWS-managed basic execution policy.
        self.role = role = iam.Role(self, "ApiFunctionRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
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
        fn: lambda_.Function
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
        self.function = fn
        self._grant(props)
        if opts.lambda_asset_dir:
            suppress(fn, *[(rule, f"Python {LAMBDA_PYTHON} on purpose: the runtime infra/package_lambda.py builds "
                                  "wheels for and the package was verified under (infra/README.md); move both together.")
                           for rule in ("AwsSolutions-L1", "Serverless-LambdaLatestVersion")])
        suppress(fn,
                 ("Serverless-LambdaDLQ", "API Gateway invokes it synchronously: a failed request is answered "
                                          "to its client, and there is no event to dead-letter."),
                 ("Serverless-LambdaTracing", "Every log line carries the request id and the worker publishes EMF "
                                              "metrics; X-Ray would cost per request with nobody reading it."))
        data.suppress_prefix_wildcards(role)
        return log_group, target

    def _gateway(self, opts: StackOptions, target: lambda_.IFunction) -> logs.LogGroup:
        """The HTTP API in front of `target`, its throttled stage; returns the access-log group."""
        # No cors_preflight: the gateway would answer preflights itself with its own origin list and
        # override the app's ACESTEP_CORS_ORIGINS. No default stage: the stage below throttles and logs.
        self.http_api = http_api = apigw.HttpApi(
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
        return access_logs

    def _grant(self, props: ApiProps) -> None:
        """Submit/poll/serve only: no Scan, no queue receive, S3 writes only under uploads/.

        Every grant here is needed by a call the API makes: tests/test_aws_e2e.py runs it with only these
        statements and checks its calls against them (tests/iam_support.py, which lists the exceptions)."""
        role, data, queues = self.role, props.data, props.queues
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskTable",  # items only (transactions are authorized per item); DeleteItem: a stale idempotency key
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem",
                     "dynamodb:DeleteItem"],
            resources=[data.table.table_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskIndexes",  # queue positions and listings read the indexes, never the table
            actions=["dynamodb:Query"],
            resources=[f"{data.table.table_arn}/index/*"],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="EnqueueTasks",
            actions=["sqs:SendMessage", "sqs:GetQueueAttributes"],
            resources=[queues.main.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="EnqueueInteractiveTasks",  # /format_input's task, to the interactive lane
            actions=["sqs:SendMessage"],
            resources=[queues.interactive.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadAudio",  # HeadObject and the presigned GET both need GetObject
            actions=["s3:GetObject"],
            resources=[data.bucket.arn_for_objects(OUTPUTS_PREFIX + "*"),
                       data.bucket.arn_for_objects(UPLOADS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="StoreAdapters",  # POST /v1/adapters keeps a checked upload under its sha256; DELETE removes it
            actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            resources=[data.bucket.arn_for_objects(ADAPTERS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="WriteUploads",  # multipart uploads, presigned PUTs, and undoing a refused submit
            actions=["s3:PutObject", "s3:DeleteObject"],
            resources=[data.bucket.arn_for_objects(UPLOADS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ApiKey",
            actions=["secretsmanager:GetSecretValue"],
            resources=[data.api_key.secret_arn, data.signing_secret.secret_arn, data.webhook_secret.secret_arn],
        ))

    def wake_workers_on_submit(self, service: ecs.Ec2Service) -> None:
        """Scale from zero: the API starts the worker service when a task arrives and it runs none."""
        self.function.add_environment("ACESTEP_ECS_CLUSTER", service.cluster.cluster_name)
        self.function.add_environment("ACESTEP_ECS_SERVICE", service.service_name)
        self.role.add_to_principal_policy(iam.PolicyStatement(
            sid="WakeWorkers",
            actions=["ecs:DescribeServices", "ecs:UpdateService"],
            resources=[service.service_arn],
        ))


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

"""The AWS deployment: HTTP API + Lambda, DynamoDB, SQS + DLQ, S3, and GPU workers on ECS.

Knobs come from CDK context (`cdk deploy -c key=value`); see StackOptions for the names and
defaults, and infra/README.md for what they cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from aws_cdk import (
    CfnOutput,
    Duration,
    RemovalPolicy,
    Stack,
    aws_apigatewayv2 as apigw,
    aws_apigatewayv2_integrations as integrations,
    aws_applicationautoscaling as appscaling,
    aws_autoscaling as autoscaling,
    aws_cloudwatch as cloudwatch,
    aws_cloudwatch_actions as cw_actions,
    aws_dynamodb as dynamodb,
    aws_ec2 as ec2,
    aws_ecs as ecs,
    aws_iam as iam,
    aws_lambda as lambda_,
    aws_logs as logs,
    aws_s3 as s3,
    aws_secretsmanager as secretsmanager,
    aws_sns as sns,
    aws_sns_subscriptions as subscriptions,
    aws_sqs as sqs,
)
from constructs import Construct

from service.aws import schema
from service.blob_keys import MODELS_PREFIX
from service.blob_keys import OUTPUTS_PREFIX as OUTPUT_PREFIX
from service.observability.metrics import NAMESPACE as METRICS_NAMESPACE
from service.blob_keys import UPLOADS_PREFIX as UPLOAD_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StackOptions:
    """Deployment knobs; each is also a CDK context key of the same name."""

    # Lambda code: a directory holding the built package (zip asset, see infra/README.md), or
    # empty to build the `lambda` target of the Dockerfile as a container image at deploy time.
    lambda_asset_dir: str = ""
    # Worker image: a registry URI (e.g. an ECR repo you pushed to), or empty to build the
    # Dockerfile's `worker` target at deploy time.
    worker_image: str = ""
    instance_type: str = "g5.xlarge"  # 1x A10G 24 GB; g6.xlarge (1x L4 24 GB) also works
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

        self.bucket = s3.Bucket(
            self, "Audio",
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
            # Browsers upload straight to S3 with the presigned PUT URL and play audio from it.
            cors=[s3.CorsRule(allowed_methods=[s3.HttpMethods.PUT, s3.HttpMethods.GET],
                              allowed_origins=["*"], allowed_headers=["Content-Type"], max_age=3600)],
        )

        # -- queue -------------------------------------------------------------------------------
        self.dlq = sqs.Queue(
            self, "TasksDlq",
            retention_period=Duration.days(14),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
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

        common_env = {
            "ACESTEP_BACKEND": "aws",
            "ACESTEP_TABLE_NAME": self.table.table_name,
            "ACESTEP_QUEUE_URL": self.queue.queue_url,
            "ACESTEP_BUCKET": self.bucket.bucket_name,
            "ACESTEP_TASK_TTL_DAYS": str(opts.task_ttl_days),
            "ACESTEP_MAX_RECEIVES": str(opts.max_receives),
            "ACESTEP_CONFIG_PATH": opts.config_path,
        }

        self.api_function = self._api(opts, common_env)
        self.worker_service = self._workers(opts, common_env)
        self._alarms(opts)

    # -- API: HTTP API -> Lambda ------------------------------------------------------------------

    def _api(self, opts: StackOptions, env: dict) -> lambda_.Function:
        api_env = {
            **env,
            "ACESTEP_QUEUE_MAXSIZE": str(opts.queue_maxsize),
            "ACESTEP_AUDIO_URL_TTL": str(opts.audio_url_ttl),
            "ACESTEP_API_KEY_SECRET_ARN": self.api_key.secret_arn,
        }
        common = dict(
            memory_size=1024,  # CPU scales with memory: 1 GB keeps the cold start short
            timeout=Duration.seconds(29),  # HTTP API integrations time out at 30 s
            environment=api_env,
            log_group=logs.LogGroup(self, "ApiLogs", retention=logs.RetentionDays.ONE_MONTH,
                                    removal_policy=RemovalPolicy.DESTROY),
            architecture=lambda_.Architecture.X86_64,
        )
        if opts.lambda_asset_dir:
            fn = lambda_.Function(
                self, "ApiFunction",
                runtime=lambda_.Runtime.PYTHON_3_11,
                handler="entrypoints.lambda_api.handler",
                code=lambda_.Code.from_asset(opts.lambda_asset_dir),
                **common,
            )
        else:
            fn = lambda_.DockerImageFunction(
                self, "ApiFunction",
                code=lambda_.DockerImageCode.from_image_asset(str(REPO_ROOT), target="lambda"),
                **common,
            )
        self._grant_api(fn.role)

        http_api = apigw.HttpApi(
            self, "HttpApi",
            default_integration=integrations.HttpLambdaIntegration("ApiIntegration", fn),
            cors_preflight=apigw.CorsPreflightOptions(
                allow_origins=["*"], allow_headers=["Authorization", "Content-Type"],
                allow_methods=[apigw.CorsHttpMethod.ANY]),
        )
        CfnOutput(self, "ApiUrl", value=http_api.api_endpoint)
        CfnOutput(self, "ApiKeySecretArn", value=self.api_key.secret_arn)
        return fn

    def _grant_api(self, role: iam.IRole) -> None:
        """Submit/poll/serve only: no Scan, no queue receive, S3 writes only under uploads/."""
        table_arns = [self.table.table_arn, f"{self.table.table_arn}/index/*"]
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskTable",
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query", "dynamodb:PutItem",
                     "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:ConditionCheckItem"],
            resources=table_arns,
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="EnqueueTasks",
            actions=["sqs:SendMessage", "sqs:GetQueueAttributes"],
            resources=[self.queue.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadAudio",  # HeadObject and the presigned GET both need GetObject
            actions=["s3:GetObject"],
            resources=[self.bucket.arn_for_objects(OUTPUT_PREFIX + "*"),
                       self.bucket.arn_for_objects(UPLOAD_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="WriteUploads",  # multipart uploads, presigned PUTs, and undoing a refused submit
            actions=["s3:PutObject", "s3:DeleteObject"],
            resources=[self.bucket.arn_for_objects(UPLOAD_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ApiKey",
            actions=["secretsmanager:GetSecretValue"],
            resources=[self.api_key.secret_arn],
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
        cluster = ecs.Cluster(self, "Cluster", vpc=vpc, container_insights_v2=ecs.ContainerInsights.ENABLED)
        security_group = ec2.SecurityGroup(self, "WorkerSg", vpc=vpc, allow_all_outbound=True,
                                           description="ACE-Step GPU workers: no inbound traffic")
        asg = autoscaling.AutoScalingGroup(
            self, "GpuInstances",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            associate_public_ip_address=True,
            security_group=security_group,
            instance_type=ec2.InstanceType(opts.instance_type),
            machine_image=ecs.EcsOptimizedImage.amazon_linux2(ecs.AmiHardwareType.GPU),
            min_capacity=0,
            max_capacity=opts.max_workers,
            require_imdsv2=True,
            block_devices=[autoscaling.BlockDevice(
                device_name="/dev/xvda",
                # Room for the image (~10 GB) and the model weights cache (~10-20 GB).
                volume=autoscaling.BlockDeviceVolume.ebs(120, volume_type=autoscaling.EbsDeviceVolumeType.GP3,
                                                         encrypted=True))],
        )
        # The worker runs as uid 1000 (Dockerfile): give it the host's weights cache directory.
        asg.add_user_data("mkdir -p /opt/acestep/checkpoints", "chown 1000:1000 /opt/acestep/checkpoints")
        capacity = ecs.AsgCapacityProvider(
            self, "GpuCapacity",
            auto_scaling_group=asg,
            enable_managed_scaling=True,
            target_capacity_percent=100,
            # Workers release their task on SIGTERM, so instances need no scale-in protection.
            enable_managed_termination_protection=False,
        )
        cluster.add_asg_capacity_provider(capacity)

        task_def = ecs.Ec2TaskDefinition(self, "WorkerTask")
        # Weights are cached on the instance, not baked into the image: a restarted task on the same
        # host skips the download.
        task_def.add_volume(name="checkpoints", host=ecs.Host(source_path="/opt/acestep/checkpoints"))
        image = (ecs.ContainerImage.from_registry(opts.worker_image) if opts.worker_image
                 else ecs.ContainerImage.from_asset(str(REPO_ROOT), target="worker"))
        container = task_def.add_container(
            "worker",
            image=image,
            gpu_count=1,
            memory_reservation_mib=12 * 1024,
            # ECS waits stop_timeout after SIGTERM before SIGKILL; the worker releases an unfinished
            # task before that (grace period below) so another worker picks it up at once.
            stop_timeout=Duration.seconds(120),
            command=["--backend", "aws", "--grace-seconds", "100"],
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
            logging=ecs.LogDrivers.aws_logs(stream_prefix="worker", log_retention=logs.RetentionDays.ONE_MONTH),
        )
        container.add_mount_points(ecs.MountPoint(container_path="/checkpoints", source_volume="checkpoints",
                                                  read_only=False))
        self._grant_worker(task_def.task_role)

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
        CfnOutput(self, "ClusterName", value=cluster.cluster_name)
        CfnOutput(self, "WorkerServiceName", value=service.service_name)
        return service

    def backlog_metric(self) -> cloudwatch.IMetric:
        """Tasks waiting plus tasks running: scale-in never drops below the work in hand."""
        period = Duration.minutes(1)
        return cloudwatch.MathExpression(
            expression="waiting + running",
            using_metrics={
                "waiting": self.queue.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum"),
                "running": self.queue.metric_approximate_number_of_messages_not_visible(period=period, statistic="Maximum"),
            },
            period=period,
            label="Backlog (waiting + running tasks)",
        )

    def _grant_worker(self, role: iam.IRole) -> None:
        """Lease/finish tasks, read inputs, write outputs, drain the DLQ. No API key: workers do not need it."""
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="LeaseTasks",
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                     "sqs:GetQueueAttributes"],
            resources=[self.queue.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="DrainDeadLetters",
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
            resources=[self.dlq.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskTable",
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query", "dynamodb:PutItem",
                     "dynamodb:UpdateItem", "dynamodb:ConditionCheckItem"],
            resources=[self.table.table_arn, f"{self.table.table_arn}/index/*"],
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
            sid="ReadModelMirror",  # weights published once with `acestep-models publish`
            actions=["s3:GetObject"],
            resources=[self.bucket.arn_for_objects(MODELS_PREFIX + "*")],
        ))

    # -- alarms -----------------------------------------------------------------------------------

    def _alarms(self, opts: StackOptions) -> None:
        topic = sns.Topic(self, "Alarms", display_name="ACE-Step alarms")
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


def workers_for_backlog(backlog: int, backlog_per_worker: int, max_workers: int) -> int:
    """What the scaling steps compute, as plain arithmetic (documented in infra/README.md)."""
    return min(max_workers, math.ceil(max(0, backlog) / backlog_per_worker))

"""The GPU workers: VPC, ECS cluster on a GPU instance group, the worker task and service, backlog scaling."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack, Token, aws_applicationautoscaling as appscaling
from aws_cdk import aws_autoscaling as autoscaling, aws_ec2 as ec2, aws_ecr as ecr, aws_ecs as ecs, aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.sections.data import DataResources
from infra.sections.logical_ids import Section
from infra.sections.queues import TaskQueues
from infra.nag import suppress
from infra.options import StackOptions
from service.blob_keys import ADAPTERS_PREFIX, MODELS_PREFIX, OUTPUTS_PREFIX, UPLOADS_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[2]
# The worker writes its heartbeat here; the container health check reads it (acestep-worker --healthcheck).
HEARTBEAT_FILE = "/tmp/acestep-heartbeat.json"
# A private ECR image (`-c worker_image=<account>.dkr.ecr.<region>.amazonaws.com/<repo>[:tag|@digest]`): the
# task's execution role is granted pull on that repository. Any other registry is pulled anonymously.
ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                       r"(?P<name>[a-z0-9][a-z0-9._/-]*?)(?::(?P<tag>[\w][\w.-]*)|@(?P<digest>sha256:[0-9a-f]{64}))?$")


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


def _nag_value(value: str, pseudo: str) -> str:
    """How cdk-nag writes the stack's account or region in a rule id: the value, or `<AWS::AccountId>`
    when the stack is environment-agnostic (synth without credentials)."""
    return f"<{pseudo}>" if Token.is_unresolved(value) else value


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


def workers_for_backlog(backlog: int, backlog_per_worker: int, max_workers: int) -> int:
    """What the scaling steps compute, as plain arithmetic (documented in infra/README.md)."""
    return min(max_workers, math.ceil(max(0, backlog) / backlog_per_worker))


@dataclass(frozen=True)
class WorkerProps:
    options: StackOptions
    data: DataResources
    queues: TaskQueues
    environment: dict[str, str]  # the stack's service_environment, with where clients reach the API


@dataclass(frozen=True)
class WorkerFleet:
    cluster: ecs.Cluster
    service: ecs.Ec2Service
    gpu_instances: autoscaling.AutoScalingGroup


class Workers(Section):
    """ECS on GPU instances, scaled on the queues' backlog from zero. Publishes `fleet`."""

    def __init__(self, scope: Construct, construct_id: str, props: WorkerProps):
        super().__init__(scope, construct_id)
        opts, data, queues = props.options, props.data, props.queues
        vpc = self._network(data)
        cluster = ecs.Cluster(self, "Cluster", vpc=vpc, container_insights_v2=ecs.ContainerInsights.ENABLED)
        asg, capacity = self._capacity(opts, vpc, cluster)
        task_def, worker_logs = self._task_definition(props, cluster)
        service = self._service(opts, queues, cluster, task_def, capacity)
        self.fleet = WorkerFleet(cluster, service, asg)
        CfnOutput(self, "ClusterName", value=cluster.cluster_name)
        CfnOutput(self, "WorkerServiceName", value=service.service_name)
        CfnOutput(self, "WorkerLogGroup", value=worker_logs.log_group_name)
        CfnOutput(self, "GpuInstanceGroupName", value=asg.auto_scaling_group_name)

    def _network(self, data: DataResources) -> ec2.Vpc:
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
        vpc.add_flow_log("FlowLogs", destination=ec2.FlowLogDestination.to_s3(data.log_bucket, "vpc-flow-logs/"))
        return vpc

    def _capacity(self, opts: StackOptions, vpc: ec2.Vpc,
                  cluster: ecs.Cluster) -> tuple[autoscaling.AutoScalingGroup, ecs.AsgCapacityProvider]:
        """The GPU instance group and the cluster's capacity provider over it."""
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
        return asg, capacity

    def _task_definition(self, props: WorkerProps, cluster: ecs.Cluster) -> tuple[ecs.Ec2TaskDefinition, logs.LogGroup]:
        """The worker container (GPU, weights volume, health check, settings), its role's grants and its logs."""
        opts, data, queues, stack = props.options, props.data, props.queues, Stack.of(self)
        task_def = ecs.Ec2TaskDefinition(self, "WorkerTask")
        # Weights are cached on the instance, not baked into the image: a restarted task on the same
        # host skips the download.
        task_def.add_volume(name="checkpoints", host=ecs.Host(source_path="/opt/acestep/checkpoints"))
        worker_logs = logs.LogGroup(self, "WorkerLogs", retention=logs.RetentionDays.ONE_MONTH,
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
                **props.environment,
                "ACESTEP_DLQ_URL": queues.dead_letters.queue_url,
                "ACESTEP_VISIBILITY_TIMEOUT": str(opts.lease_seconds),
                "ACESTEP_CHECKPOINT_DIR": "/checkpoints",
                "ACESTEP_ALLOW_DOWNLOAD": "true",
                "ACESTEP_DEMO_IF_MISSING": "false",
                # from the stack's bucket (fast, in-region) before the public hub (the fallback)
                "ACESTEP_MODELS_MIRROR": "true",
                # quantisation, offload and the 5 Hz LM, where the operator gave them (none by default)
                **opts.worker_engine_environment(),
            },
            logging=ecs.LogDrivers.aws_logs(stream_prefix="worker", log_group=worker_logs),
        )
        container.add_mount_points(ecs.MountPoint(container_path="/checkpoints", source_volume="checkpoints",
                                                  read_only=False))
        self._grant(task_def.task_role, cluster, data, queues)
        data.suppress_prefix_wildcards(task_def.task_role)
        suppress(task_def.task_role, (
            f"AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ecs:{_nag_value(stack.region, 'AWS::Region')}:"
            f"{_nag_value(stack.account, 'AWS::AccountId')}:task/<{stack.get_logical_id(cluster.node.default_child)}>/*]",
            "Scale-in protection of the worker's own task, whose id is only known at run time; limited to "
            "this cluster's tasks."))
        if task_def.execution_role is not None:  # made by an ECR image (asset or private repository): pulls it
            suppress(task_def.execution_role, (
                "AwsSolutions-IAM5[Resource::*]",
                "ecr:GetAuthorizationToken only: AWS defines no resource for it (a registry login); the image "
                "pull itself (ecr:BatchGetImage, ecr:GetDownloadUrlForLayer) is granted on the one repository."))
        suppress(task_def, ("AwsSolutions-ECS2", "Plain settings (names, limits, flags), no secrets: the worker "
                                                 "needs no API key, and a hub token would come from Secrets Manager."))
        return task_def, worker_logs

    def _service(self, opts: StackOptions, queues: TaskQueues, cluster: ecs.Cluster,
                 task_def: ecs.Ec2TaskDefinition, capacity: ecs.AsgCapacityProvider) -> ecs.Ec2Service:
        """The workers' service, from zero tasks, scaled on the queues' backlog."""
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
            metric=queues.backlog_metric(),
            scaling_steps=backlog_steps(opts.backlog_per_worker, opts.max_workers),
            adjustment_type=appscaling.AdjustmentType.EXACT_CAPACITY,
            cooldown=Duration.seconds(60),
            evaluation_periods=1,
        )
        return service

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

    @staticmethod
    def _grant(role: iam.IRole, cluster: ecs.ICluster, data: DataResources, queues: TaskQueues) -> None:
        """Lease/finish tasks, read inputs, write outputs, drain the DLQ. No API key: workers do not need it.

        Proven as for the API (Api._grant): tests/test_aws_e2e.py runs workers with only these statements."""
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="SignWebhooks",
            actions=["secretsmanager:GetSecretValue"],
            resources=[data.webhook_secret.secret_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="LeaseTasks",  # send: a task given back (shutdown) or a dead letter that never ran is sent again
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                     "sqs:GetQueueAttributes", "sqs:SendMessage"],
            resources=[queues.main.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="LeaseInteractiveTasks",  # send: as on the main queue, a give-back or a never-run dead letter
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:SendMessage"],
            resources=[queues.interactive.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="DrainDeadLetters",  # send: a given-back task past max_receives is dead-lettered by the worker
            actions=["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:SendMessage"],
            resources=[queues.dead_letters.queue_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskTable",  # items only: transactions are authorized per item; metas: conditional updates
            actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"],
            resources=[data.table.table_arn],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="TaskIndexes",
            actions=["dynamodb:Query"],
            resources=[f"{data.table.table_arn}/index/*"],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadInputs",
            actions=["s3:GetObject"],
            resources=[data.bucket.arn_for_objects(UPLOADS_PREFIX + "*"),
                       data.bucket.arn_for_objects(OUTPUTS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="WriteOutputs",  # delete: a fenced-out duplicate attempt removes its own files
            actions=["s3:PutObject", "s3:DeleteObject"],
            resources=[data.bucket.arn_for_objects(OUTPUTS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ReadModelMirror",  # weights published once with `acestep-models publish`; uploaded adapters
            actions=["s3:GetObject"],
            resources=[data.bucket.arn_for_objects(MODELS_PREFIX + "*"), data.bucket.arn_for_objects(ADAPTERS_PREFIX + "*")],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ScaleInProtection",  # through the ECS agent (service/aws/task_protection.py)
            actions=["ecs:UpdateTaskProtection"],
            resources=[Stack.of(cluster).format_arn(service="ecs", resource="task", resource_name=f"{cluster.cluster_name}/*")],
        ))

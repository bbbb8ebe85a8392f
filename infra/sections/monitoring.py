"""What tells an operator something is wrong: the workers-cannot-start watch, the alarms, the dashboard."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jsii
from aws_cdk import ArnFormat, CfnOutput, Duration, RemovalPolicy, Stack, aws_apigatewayv2 as apigw
from aws_cdk import aws_cloudwatch as cloudwatch, aws_cloudwatch_actions as cw_actions, aws_events as events
from aws_cdk import aws_iam as iam, aws_lambda as lambda_, aws_logs as logs, aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from infra.sections.logical_ids import Section
from infra.sections.queues import TaskQueues
from infra.sections.workers import WorkerFleet
from infra.nag import suppress
from infra.options import StackOptions
from service.observability.metrics import NAMESPACE as METRICS_NAMESPACE

# ECS stop codes and reasons of a task that never got to work: image pull, secrets/volumes, the worker
# exiting or failing its health check. Scale-in and deployments stop tasks with other codes.
TASK_START_FAILURE_CODES = ["TaskFailedToStart", "EssentialContainerExited"]
TASK_START_FAILURE_REASONS = ["CannotPullContainerError", "ResourceInitializationError", "CannotStartContainerError",
                              "Task failed container health checks"]
# ECS service events that say the scheduler cannot place or start tasks (capacity, configuration).
SERVICE_START_FAILURE_EVENTS = ["SERVICE_TASK_PLACEMENT_FAILURE", "SERVICE_TASK_CONFIGURATION_FAILURE",
                                "SERVICE_TASK_START_IMPAIRED"]


@dataclass(frozen=True)
class MonitoringProps:
    options: StackOptions
    queues: TaskQueues
    api_function: lambda_.IFunction
    http_api: apigw.HttpApi
    fleet: WorkerFleet


class Monitoring(Section):
    def __init__(self, scope: Construct, construct_id: str, props: MonitoringProps):
        super().__init__(scope, construct_id)
        tasks_cannot_start = self._alarm_when_tasks_cannot_start(props.fleet)
        alarms = self._alarms(props, tasks_cannot_start)
        self._dashboard(props, alarms, tasks_cannot_start)

    def _alarm_when_tasks_cannot_start(self, fleet: WorkerFleet) -> cloudwatch.Alarm:
        """Minutes, not OldestTask's half hour: EventBridge rules on the events that say the workers cannot
        start (a stopped task's reason, the service scheduler's warnings, the instance group failing to launch)
        write each event to a log group (what happened, verbatim) and count it; the alarm fires on the count."""
        cluster, service, asg, stack = fleet.cluster, fleet.service, fleet.gpu_instances, Stack.of(self)
        # EventBridge writes to log groups under /aws/events/, allowed by a resource policy (the CDK target
        # would install that policy through a custom-resource Lambda; the native resource does it).
        failure_events = logs.LogGroup(
            self, "TaskStartFailureEvents", log_group_name=f"/aws/events/{stack.stack_name}-task-start-failures",
            retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY)
        logs.ResourcePolicy(self, "TaskStartFailureEventsPolicy", policy_statements=[iam.PolicyStatement(
            principals=[iam.ServicePrincipal("events.amazonaws.com"), iam.ServicePrincipal("delivery.logs.amazonaws.com")],
            actions=["logs:CreateLogStream", "logs:PutLogEvents"],
            resources=[failure_events.log_group_arn])])
        target = _LogGroupTarget(stack.format_arn(service="logs", resource="log-group",
                                                 arn_format=ArnFormat.COLON_RESOURCE_NAME,
                                                 resource_name=failure_events.log_group_name))
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
        alarm = cloudwatch.Alarm(
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
        CfnOutput(self, "TaskStartFailureLogGroup", value=failure_events.log_group_name)
        return alarm

    def _alarms(self, props: MonitoringProps, tasks_cannot_start: cloudwatch.Alarm) -> list[cloudwatch.Alarm]:
        opts, queues = props.options, props.queues
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
                metric=queues.dead_letters.metric_approximate_number_of_messages_visible(period=Duration.minutes(1),
                                                                              statistic="Maximum"),
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            *(  # one per queue: a task (or an interactive one) that waits too long
                cloudwatch.Alarm(
                    self, construct_id, alarm_description=description,
                    metric=queue.metric_approximate_age_of_oldest_message(period=Duration.minutes(1),
                                                                         statistic="Maximum"),
                    threshold=opts.oldest_message_alarm_seconds, evaluation_periods=3,
                    comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                    treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                )
                for construct_id, queue, description in (
                    ("OldestTask", queues.main,
                     "A task has waited too long: workers are not keeping up or not starting"),
                    ("OldestInteractiveTask", queues.interactive,
                     "An interactive task (/format_input) has waited too long: no worker reads the lane"),
                )
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
            tasks_cannot_start,
            cloudwatch.Alarm(
                self, "ApiErrors",
                alarm_description="The API Lambda raised errors",
                metric=props.api_function.metric_errors(period=Duration.minutes(5), statistic="Sum"),
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        ]
        for alarm in alarms:
            alarm.add_alarm_action(action)
        CfnOutput(self, "AlarmTopicArn", value=topic.topic_arn)
        return alarms

    def _dashboard(self, props: MonitoringProps, alarms: list[cloudwatch.Alarm],
                   tasks_cannot_start: cloudwatch.Alarm) -> None:
        """One page for an operator: the queue, the workers, the API and the alarms."""
        minute = Duration.minutes(1)
        cluster, service = props.fleet.cluster.cluster_name, props.fleet.service.service_name

        def insights(metric: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(namespace="ECS/ContainerInsights", metric_name=metric, label=label,
                                     dimensions_map={"ClusterName": cluster, "ServiceName": service},
                                     statistic="Average", period=minute)

        def worker_metric(name: str, statistic: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(namespace=METRICS_NAMESPACE, metric_name=name, label=label,
                                     dimensions_map={"service": "worker"}, statistic=statistic, period=minute)

        def graph(title: str, *metrics: cloudwatch.IMetric, right: tuple = ()) -> cloudwatch.GraphWidget:
            return cloudwatch.GraphWidget(title=title, left=list(metrics), right=list(right), width=8, height=6)

        queue, dlq, fn, api = props.queues.main, props.queues.dead_letters, props.api_function, props.http_api
        dashboard = cloudwatch.Dashboard(self, "Dashboard", default_interval=Duration.hours(3))
        dashboard.add_widgets(cloudwatch.AlarmStatusWidget(title="Alarms", alarms=alarms, width=24, height=3))
        dashboard.add_widgets(
            graph("Queue: waiting and running tasks",
                  queue.metric_approximate_number_of_messages_visible(period=minute, statistic="Maximum",
                                                                      label="waiting"),
                  queue.metric_approximate_number_of_messages_not_visible(period=minute, statistic="Maximum",
                                                                          label="running"),
                  props.queues.interactive.metric_approximate_number_of_messages_visible(
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
                                    dimensions_map={"AutoScalingGroupName": props.fleet.gpu_instances.auto_scaling_group_name},
                                    statistic="Maximum", period=minute, label="in service"),
                  cloudwatch.Metric(namespace="AWS/AutoScaling", metric_name="GroupPendingInstances",
                                    dimensions_map={"AutoScalingGroupName": props.fleet.gpu_instances.auto_scaling_group_name},
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
            graph("Events saying workers cannot start", tasks_cannot_start.metric),
        )
        CfnOutput(self, "DashboardName", value=dashboard.dashboard_name)


@jsii.implements(events.IRuleTarget)
class _LogGroupTarget:
    """An EventBridge target that is a log group, by its ARN (the policy allowing it is the stack's own)."""

    def __init__(self, arn: str):
        self._arn = arn

    def bind(self, rule: events.IRule, id: Optional[str] = None) -> events.RuleTargetConfig:
        return events.RuleTargetConfig(arn=self._arn)

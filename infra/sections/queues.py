"""The task queues: the main queue, the interactive lane, and the dead-letter queue both redrive into."""
from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import CfnOutput, Duration, aws_cloudwatch as cloudwatch, aws_sqs as sqs
from constructs import Construct

from infra.sections.logical_ids import Section
from infra.nag import suppress
from infra.options import StackOptions


@dataclass(frozen=True)
class TaskQueues:
    main: sqs.Queue
    interactive: sqs.Queue  # /format_input's LM-only tasks (service/lanes.py)
    dead_letters: sqs.Queue

    def backlog_metric(self) -> cloudwatch.IMetric:
        """Tasks waiting plus tasks running, in both lanes: scale-in never drops below the work in hand."""
        period = Duration.minutes(1)
        main, lane = self.main, self.interactive
        return cloudwatch.MathExpression(
            expression="waiting + running + lanewaiting + lanerunning",
            using_metrics={
                "waiting": main.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum"),
                "running": main.metric_approximate_number_of_messages_not_visible(period=period, statistic="Maximum"),
                "lanewaiting": lane.metric_approximate_number_of_messages_visible(period=period, statistic="Maximum"),
                "lanerunning": lane.metric_approximate_number_of_messages_not_visible(period=period, statistic="Maximum"),
            },
            period=period,
            label="Backlog (waiting + running tasks)",
        )


class Queues(Section):
    def __init__(self, scope: Construct, construct_id: str, options: StackOptions):
        super().__init__(scope, construct_id)
        opts = options
        dlq = sqs.Queue(
            self, "TasksDlq",
            retention_period=Duration.days(14),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        suppress(dlq, *[(rule, "This is the dead-letter queue; the worker drains it into failed tasks "
                               "(service/aws/dlq.py).") for rule in ("AwsSolutions-SQS3", "Serverless-SQSRedrivePolicy")])
        queue = sqs.Queue(
            self, "TasksQueue",
            # Longer than the worker's lease, which the worker sets per receive and keeps extending.
            visibility_timeout=Duration.seconds(opts.lease_seconds + 60),
            retention_period=Duration.days(4),
            receive_message_wait_time=Duration.seconds(20),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=opts.max_receives),
        )
        # The interactive lane (service/lanes.py): /format_input's LM-only tasks, which a client waits for
        # with the request open; workers read it before the main queue (service/aws/sqs_queue.py). Same
        # lease and redrive as the main queue, into the same DLQ (one drain, one DeadLetters alarm).
        interactive = sqs.Queue(
            self, "InteractiveQueue",
            visibility_timeout=Duration.seconds(opts.lease_seconds + 60),
            retention_period=Duration.days(4),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=opts.max_receives),
        )
        self.queues = TaskQueues(queue, interactive, dlq)
        CfnOutput(self, "QueueUrl", value=queue.queue_url)
        CfnOutput(self, "DlqUrl", value=dlq.queue_url)
        CfnOutput(self, "InteractiveQueueUrl", value=interactive.queue_url)

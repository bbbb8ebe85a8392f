"""The AWS deployment: HTTP API + Lambda, DynamoDB, SQS + DLQ, S3, and GPU workers on ECS.

Knobs come from CDK context (`cdk deploy -c key=value`); see StackOptions (infra/options.py) for the
names and defaults, and infra/README.md for what they cost. Each part is a construct in
infra/sections/; this stack builds them in order and hands each the typed resources it needs.
"""
from __future__ import annotations

from typing import Any, Optional

from aws_cdk import CfnElement, Stack
from constructs import Construct

from infra.sections import SECTIONS
from infra.sections.api import Api, ApiProps
from infra.sections.data import Data, DataResources
from infra.sections.edge import Edge, EdgeProps
from infra.sections.logical_ids import LogicalIds
from infra.sections.monitoring import Monitoring, MonitoringProps
from infra.sections.queues import Queues, TaskQueues
from infra.sections.workers import (HEARTBEAT_FILE, WorkerProps, Workers, backlog_steps, parse_ecr_image,
                                      workers_for_backlog)
from infra.options import StackOptions

__all__ = ["AceStepStack", "StackOptions", "HEARTBEAT_FILE", "SECTIONS", "backlog_steps", "parse_ecr_image",
           "service_environment", "workers_for_backlog"]


def service_environment(opts: StackOptions, data: DataResources, queues: TaskQueues) -> dict[str, str]:
    """What the API and the workers both read: where the tasks, queues and files are, and which models serve."""
    extra_models = {name: path.strip() for name, path in (("ACESTEP_CONFIG_PATH2", opts.config_path2),
                                                          ("ACESTEP_CONFIG_PATH3", opts.config_path3)) if path.strip()}
    return {
        "ACESTEP_BACKEND": "aws",
        "ACESTEP_TABLE_NAME": data.table.table_name,
        "ACESTEP_QUEUE_URL": queues.main.queue_url,
        "ACESTEP_INTERACTIVE_QUEUE_URL": queues.interactive.queue_url,  # the API sends, workers read first
        "ACESTEP_BUCKET": data.bucket.bucket_name,
        "ACESTEP_TASK_TTL_DAYS": str(opts.task_ttl_days),
        "ACESTEP_MAX_RECEIVES": str(opts.max_receives),
        "ACESTEP_CONFIG_PATH": opts.config_path,
        "ACESTEP_WEBHOOK_SECRET_ARN": data.webhook_secret.secret_arn,  # both sign: workers, the API on cancel
        **extra_models,
    }


class AceStepStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, options: Optional[StackOptions] = None, **kwargs: Any):
        super().__init__(scope, construct_id, **kwargs)
        # Logical ids as if every resource sat directly in the stack (sections/logical_ids.py): the
        # constructs below group resources without replacing any on a stack deployed before they existed.
        self._logical_ids = LogicalIds(self)
        # New AWS accounts cannot create launch configurations: have the ASG use a launch template.
        self.node.set_context("@aws-cdk/aws-autoscaling:generateLaunchTemplateInsteadOfLaunchConfig", True)
        self.options = opts = options or StackOptions.from_context(self)

        self.data = Data(self, "Data", opts).resources
        self.queues = Queues(self, "Queues", opts).queues
        environment = service_environment(opts, self.data, self.queues)
        self.api = Api(self, "Api", ApiProps(opts, self.data, self.queues, environment))
        edge = Edge(self, "Edge", EdgeProps(opts, self.api.http_api, self.data.log_bucket)) if opts.cloudfront else None
        # Workers send the webhooks: their file URLs are made absolute under where clients reach the API.
        public_url = edge.url if edge is not None else self.api.http_api.api_endpoint
        self.workers = Workers(self, "Workers", WorkerProps(
            opts, self.data, self.queues, {**environment, "ACESTEP_PUBLIC_BASE_URL": public_url})).fleet
        self.api.wake_workers_on_submit(self.workers.service)
        Monitoring(self, "Monitoring", MonitoringProps(opts, self.queues, self.api.function, self.api.http_api,
                                                       self.workers))

    def _allocate_logical_id(self, cfn_element: CfnElement) -> str:
        return self._logical_ids.allocate(cfn_element)

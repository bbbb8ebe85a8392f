"""Create the table, queues and bucket the AWS backend needs — for local dev (moto, localstack) and tests.

Production resources come from the CDK stack in infra/; this module mirrors its schema (both read
schema.py). Every step is idempotent, so it can run on each start of a dev environment.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from ..config import Settings
from . import schema as S
from .clients import AwsClient, aws_client, error_code

DEFAULT_TABLE = "acestep-tasks"
DEFAULT_QUEUE = "acestep-tasks"
DEFAULT_BUCKET = "acestep-audio"
DLQ_RETENTION_SECONDS = 14 * 86400


def provision(settings: Settings) -> Settings:
    """Create what is missing and return the settings with table/queue/DLQ/bucket names filled in."""
    table = settings.table_name or DEFAULT_TABLE
    bucket = settings.bucket or DEFAULT_BUCKET
    ensure_table(aws_client("dynamodb", settings), table)
    queue_url, dlq_url = ensure_queues(
        aws_client("sqs", settings), _queue_name(settings.queue_url) or DEFAULT_QUEUE,
        max_receives=settings.max_receives, visibility_timeout=settings.visibility_timeout,
    )
    interactive_url = ""
    if settings.interactive_queue_url:  # the interactive lane, only where asked for (a name or URL)
        interactive_url = ensure_lane_queue(aws_client("sqs", settings), _queue_name(settings.interactive_queue_url),
                                            dlq_url, max_receives=settings.max_receives,
                                            visibility_timeout=settings.visibility_timeout)
    ensure_bucket(aws_client("s3", settings), bucket, settings.aws_region)
    sm = aws_client("secretsmanager", settings)
    signing = settings.signing_secret_arn or ensure_signing_secret(sm, f"{table}-url-signing")
    webhook = settings.webhook_secret_arn or ensure_signing_secret(sm, f"{table}-webhook-signing")
    return settings.model_copy(update=dict(table_name=table, queue_url=queue_url, dlq_url=dlq_url, bucket=bucket,
                                           interactive_queue_url=interactive_url,
                                           signing_secret_arn=signing, webhook_secret_arn=webhook))


def ensure_signing_secret(sm: AwsClient, name: str) -> str:
    """A random secret (the stack's UrlSigningSecret, WebhookSigningSecret); returns its ARN."""
    try:
        arn: str = sm.describe_secret(SecretId=name)["ARN"]
        return arn
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
    created: str = sm.create_secret(Name=name, SecretString=secrets.token_urlsafe(48))["ARN"]
    return created


def ensure_table(ddb: AwsClient, name: str) -> None:
    try:
        ddb.create_table(
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": S.PK, "AttributeType": "S"},
                                  *(attribute for index in INDEXES for attribute in index.attributes())],
            KeySchema=[{"AttributeName": S.PK, "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[index.definition() for index in INDEXES],
        )
        ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    except ClientError as exc:
        if error_code(exc) != "ResourceInUseException":
            raise
        _add_missing_index(ddb, name)
    ttl = ddb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        ddb.update_time_to_live(
            TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": S.TTL_ATTR}
        )


@dataclass(frozen=True)
class SparseIndex:
    """A global secondary index keyed by a string partition (a mark only some items carry) and a number."""
    name: str
    part: str
    sort: str
    projection: dict[str, Any]

    def attributes(self) -> list[dict[str, str]]:
        return [{"AttributeName": self.part, "AttributeType": "S"}, {"AttributeName": self.sort, "AttributeType": "N"}]

    def definition(self) -> dict[str, Any]:
        return {"IndexName": self.name,
                "KeySchema": [{"AttributeName": self.part, "KeyType": "HASH"},
                              {"AttributeName": self.sort, "KeyType": "RANGE"}],
                "Projection": self.projection}


_KEYS_ONLY = {"ProjectionType": "KEYS_ONLY"}
QUEUED_INDEX = SparseIndex(S.QUEUED_INDEX, S.QUEUED_PART, S.QUEUED_SORT, _KEYS_ONLY)
FINISHED_INDEX = SparseIndex(S.FINISHED_INDEX, S.FINISHED_PART, S.FINISHED_SORT,
                             {"ProjectionType": "INCLUDE", "NonKeyAttributes": [S.DURATION_ATTR]})
WEBHOOK_INDEX = SparseIndex(S.WEBHOOK_INDEX, S.WEBHOOK_PART, S.WEBHOOK_DUE,
                            {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["webhook_url", S.WEBHOOK_ATTEMPTS]})
UNSENT_INDEX = SparseIndex(S.UNSENT_INDEX, S.UNSENT_PART, S.UNSENT_SINCE, _KEYS_ONLY)
INDEXES = (QUEUED_INDEX, FINISHED_INDEX, WEBHOOK_INDEX, UNSENT_INDEX)
# Indexes added after the first release: a table made before them gets them on a later start.
LATER_INDEXES = (WEBHOOK_INDEX, UNSENT_INDEX)


def _add_missing_index(ddb: AwsClient, name: str) -> None:
    """A table made by an older version lacks a later index: add the first one missing (built in the
    background; DynamoDB creates one index per update, so the next start adds the next)."""
    have = {i["IndexName"] for i in ddb.describe_table(TableName=name)["Table"].get("GlobalSecondaryIndexes", [])}
    for index in LATER_INDEXES:
        if index.name not in have:
            ddb.update_table(TableName=name, AttributeDefinitions=index.attributes(),
                             GlobalSecondaryIndexUpdates=[{"Create": index.definition()}])
            return


def ensure_queues(sqs: AwsClient, name: str, *, max_receives: int, visibility_timeout: float) -> tuple[str, str]:
    """The work queue and its dead-letter queue; returns (queue_url, dlq_url)."""
    dlq_url = _create_or_update(sqs, name + "-dlq", {"MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)})
    queue_url = ensure_lane_queue(sqs, name, dlq_url, max_receives=max_receives, visibility_timeout=visibility_timeout)
    return queue_url, dlq_url


def ensure_lane_queue(sqs: AwsClient, name: str, dlq_url: str, *, max_receives: int, visibility_timeout: float) -> str:
    """A work queue redriving to `dlq_url` (the main queue, or the interactive lane's: one DLQ for both)."""
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return _create_or_update(sqs, name, {
        "VisibilityTimeout": str(max(1, int(visibility_timeout))),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}),
    })


def ensure_bucket(s3: AwsClient, name: str, region: str) -> None:
    kwargs: dict[str, Any] = {"Bucket": name}
    if region and region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except ClientError as exc:
        if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _create_or_update(sqs: AwsClient, name: str, attributes: dict[str, Any]) -> str:
    try:
        queue_url: str = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        return queue_url
    except ClientError as exc:
        if error_code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
            raise
    url: str = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


def _queue_name(queue_url: str) -> str:
    return queue_url.rstrip("/").rsplit("/", 1)[-1] if queue_url else ""

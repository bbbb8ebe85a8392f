"""AWS backend: DynamoDB task store, SQS queue (+ dead-letter queue), S3 blobs."""
from __future__ import annotations

import logging
from typing import Optional

from ..config import Settings
from ..ports import Backend
from ..signing_keys import CachedKeys
from ..webhooks.signature import key_from_text
from .clients import aws_client
from .dlq import drain_dead_letters
from .dynamo_store import DynamoTaskStore
from .ghosts import resend_ghosts
from .intake import AwsTaskIntake
from .s3_blobs import S3BlobStore
from .signing_secret import SecretsManagerSigningSecret
from .sqs_queue import SqsTaskQueue
from .wake_workers import EcsWorkerWaker

log = logging.getLogger(__name__)


class AwsConfigError(ValueError):
    pass


def make_aws_backend(settings: Settings) -> Backend:
    missing = [env for env, value in (("ACESTEP_TABLE_NAME", settings.table_name),
                                      ("ACESTEP_QUEUE_URL", settings.queue_url),
                                      ("ACESTEP_BUCKET", settings.bucket)) if not value]
    if missing:
        raise AwsConfigError("ACESTEP_BACKEND=aws needs " + ", ".join(missing))
    # Path-style addressing when an endpoint is given: moto/localstack on 127.0.0.1 have no bucket subdomains.
    s3_config = {"signature_version": "s3v4",
                 "s3": {"addressing_style": "path" if settings.aws_endpoint_url else "virtual"}}
    blobs = S3BlobStore(aws_client("s3", settings, s3_config), settings.bucket)
    store = DynamoTaskStore(aws_client("dynamodb", settings), settings.table_name, settings.task_ttl_days, blobs)
    queue = SqsTaskQueue(aws_client("sqs", settings), settings.queue_url, settings.dlq_url,
                         max_receives=settings.max_receives, interactive_url=settings.interactive_queue_url)
    backend = Backend(
        store=store,
        queue=queue,
        blobs=blobs,
        intake=AwsTaskIntake(store, queue, on_queued=_worker_waker(settings)),
        name="aws",
    )
    if settings.signing_secret_arn:
        secret = SecretsManagerSigningSecret(aws_client("secretsmanager", settings), settings.signing_secret_arn)
        backend.signing_keys = CachedKeys(secret.load)
    else:
        log.warning("ACESTEP_SIGNING_SECRET_ARN is not set: signed URLs use a secret of this process only")
    if settings.webhook_secret_arn:
        hook_secret = SecretsManagerSigningSecret(aws_client("secretsmanager", settings), settings.webhook_secret_arn,
                                                  decode=key_from_text)
        backend.webhook_keys = CachedKeys(hook_secret.load)
    else:
        log.warning("ACESTEP_WEBHOOK_SECRET_ARN is not set: webhooks are signed with a secret of this process only, "
                    "which no receiver can verify")
    # The worker loop calls backend.drain_dead_letters() now and then (None on backends without a DLQ).
    # Ghost tasks (queued without a message, ghosts.py) are sent on the same schedule.
    backend.drain_dead_letters = lambda: len(drain_dead_letters(backend)) + len(resend_ghosts(store, queue))
    return backend


def _worker_waker(settings: Settings) -> Optional[EcsWorkerWaker]:
    """Scale from zero on submit, where the stack names the worker service (ACESTEP_ECS_*)."""
    if not (settings.ecs_cluster and settings.ecs_service):
        return None
    return EcsWorkerWaker(lambda: aws_client("ecs", settings), settings.ecs_cluster, settings.ecs_service)


__all__ = ["make_aws_backend", "AwsConfigError", "DynamoTaskStore", "SqsTaskQueue", "S3BlobStore"]

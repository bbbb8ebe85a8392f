"""What outlives a deploy: the task table, the audio and access-log buckets, and the secrets."""
from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack, aws_dynamodb as dynamodb, aws_iam as iam
from aws_cdk import aws_s3 as s3, aws_secretsmanager as secretsmanager
from constructs import Construct

from infra.sections.logical_ids import Section
from infra.nag import suppress
from infra.options import StackOptions
from service.aws import schema
from service.blob_keys import ADAPTERS_PREFIX, MODELS_PREFIX, OUTPUTS_PREFIX, UPLOADS_PREFIX


@dataclass(frozen=True)
class DataResources:
    table: dynamodb.Table
    bucket: s3.Bucket  # audio (outputs/, uploads/), published weights (models/), adapters (adapters/)
    log_bucket: s3.Bucket  # access logs of the audio bucket, CloudFront and the VPC
    api_key: secretsmanager.ISecret
    signing_secret: secretsmanager.Secret  # signed audio/upload URLs
    webhook_secret: secretsmanager.Secret  # webhook signatures

    def suppress_prefix_wildcards(self, role: iam.IConstruct) -> None:
        """The wildcards in the roles' grants are object prefixes and the table's indexes, never whole services."""
        stack = Stack.of(role)
        bucket = f"<{stack.get_logical_id(self.bucket.node.default_child)}.Arn>"
        table = f"<{stack.get_logical_id(self.table.node.default_child)}.Arn>"
        reasons = {
            f"{bucket}/{OUTPUTS_PREFIX}*": "Result files: keys are made per task and attempt at run time.",
            f"{bucket}/{UPLOADS_PREFIX}*": "Uploaded sources: keys are made per upload at run time.",
            f"{bucket}/{MODELS_PREFIX}*": "Published model weights (acestep-models publish), read only.",
            f"{bucket}/{ADAPTERS_PREFIX}*": "Uploaded LoRA/LoKr adapters: keys are their sha256, made at upload.",
            f"{table}/index/*": "The task table's own indexes (service/aws/schema.py).",
        }
        suppress(role, *[(f"AwsSolutions-IAM5[Resource::{resource}]", reason) for resource, reason in reasons.items()])


class Data(Section):
    def __init__(self, scope: Construct, construct_id: str, options: StackOptions):
        super().__init__(scope, construct_id)
        opts = options
        removal = RemovalPolicy.DESTROY if opts.destroy_data_on_delete else RemovalPolicy.RETAIN
        table = self._table(removal)
        log_bucket, bucket = self._buckets(opts, removal)
        self.resources = DataResources(table, bucket, log_bucket, *self._secrets(opts))
        CfnOutput(self, "BucketName", value=bucket.bucket_name,
                  description="audio and published weights: acestep-models publish --bucket <this>")
        CfnOutput(self, "TableName", value=table.table_name)

    def _table(self, removal: RemovalPolicy) -> dynamodb.Table:
        table = dynamodb.Table(
            self, "Tasks",
            partition_key=dynamodb.Attribute(name=schema.PK, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute=schema.TTL_ATTR,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            removal_policy=removal,
        )
        table.add_global_secondary_index(
            index_name=schema.QUEUED_INDEX,
            partition_key=dynamodb.Attribute(name=schema.QUEUED_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.QUEUED_SORT, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.KEYS_ONLY,
        )
        table.add_global_secondary_index(
            index_name=schema.FINISHED_INDEX,
            partition_key=dynamodb.Attribute(name=schema.FINISHED_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.FINISHED_SORT, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.INCLUDE,
            non_key_attributes=[schema.DURATION_ATTR],
        )
        table.add_global_secondary_index(  # the webhook outbox (service/aws/schema.py)
            index_name=schema.WEBHOOK_INDEX,
            partition_key=dynamodb.Attribute(name=schema.WEBHOOK_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.WEBHOOK_DUE, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.INCLUDE,
            non_key_attributes=["webhook_url", schema.WEBHOOK_ATTEMPTS],
        )
        table.add_global_secondary_index(  # queued tasks whose message is not known sent (service/aws/ghosts.py)
            index_name=schema.UNSENT_INDEX,
            partition_key=dynamodb.Attribute(name=schema.UNSENT_PART, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=schema.UNSENT_SINCE, type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.KEYS_ONLY,
        )
        return table

    def _buckets(self, opts: StackOptions, removal: RemovalPolicy) -> tuple[s3.Bucket, s3.Bucket]:
        cors_origins = [o.strip() for o in opts.cors_origins.split(",") if o.strip()]
        # Access logs of the audio bucket (and of CloudFront, when it is on): kept 90 days.
        log_bucket = s3.Bucket(
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
        suppress(log_bucket, ("AwsSolutions-S1", "This is the access-log bucket: logging its own accesses "
                                                 "would log the log deliveries."))
        bucket = s3.Bucket(
            self, "Audio",
            server_access_logs_bucket=log_bucket,
            server_access_logs_prefix="audio/",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            removal_policy=removal,
            auto_delete_objects=opts.destroy_data_on_delete,
            lifecycle_rules=[
                # Files live as long as the task records that point at them.
                s3.LifecycleRule(id="expire-outputs", prefix=OUTPUTS_PREFIX,
                                 expiration=Duration.days(opts.task_ttl_days)),
                s3.LifecycleRule(id="expire-uploads", prefix=UPLOADS_PREFIX,
                                 expiration=Duration.days(opts.task_ttl_days)),
                s3.LifecycleRule(id="abort-multipart", abort_incomplete_multipart_upload_after=Duration.days(1)),
            ],
            # Browsers upload straight to S3 with the presigned PUT URL and play audio from it: the same
            # origins as the API's (cors_origins), none when it is empty.
            cors=[s3.CorsRule(allowed_methods=[s3.HttpMethods.PUT, s3.HttpMethods.GET],
                              allowed_origins=cors_origins, allowed_headers=["Content-Type"], max_age=3600)]
            if cors_origins else None,
        )
        return log_bucket, bucket

    def _secrets(self, opts: StackOptions) -> tuple[secretsmanager.ISecret, secretsmanager.Secret,
                                                    secretsmanager.Secret]:
        api_key: secretsmanager.ISecret
        if opts.api_key_secret_arn:
            api_key = secretsmanager.Secret.from_secret_complete_arn(self, "ApiKey", opts.api_key_secret_arn)
        else:
            api_key = secretsmanager.Secret(
                self, "ApiKey",
                description="ACE-Step API key (clients send it as Bearer token)",
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    exclude_punctuation=True, password_length=40),
            )
            suppress(api_key, ("AwsSolutions-SMG4", "The API key is handed to clients: an automatic rotation "
                                                    "would lock them out. Rotate it by hand (infra/README.md)."))
        # Signed audio/upload URLs are keyed with their own random secret, never the API key (a
        # shared URL must not let anyone test key guesses). Rotate with put-secret-value: the
        # previous value (AWSPREVIOUS) stays valid until the next rotation.
        signing_secret = self._generated_secret(
            "UrlSigningSecret", "ACE-Step: secret for signed audio/upload URLs (not the API key)",
            "Rotated by hand with put-secret-value: the API accepts AWSPREVIOUS, so URLs already handed out keep "
            "working.")
        # Webhooks are signed with a secret of their own (Standard Webhooks), never the API key; receivers
        # get it from GET /v1/webhook_secret. After put-secret-value both values sign until the next one.
        webhook_secret = self._generated_secret(
            "WebhookSigningSecret",
            "ACE-Step: secret webhook signatures are keyed with (given to receivers; not the API key)",
            "Receivers hold it: rotated by hand with put-secret-value, after which deliveries carry both signatures.")
        return api_key, signing_secret, webhook_secret

    def _generated_secret(self, construct_id: str, description: str, rotation: str) -> secretsmanager.Secret:
        """A 64-character random secret the services key signatures with; `rotation`: why it rotates by hand."""
        secret = secretsmanager.Secret(
            self, construct_id, description=description,
            generate_secret_string=secretsmanager.SecretStringGenerator(exclude_punctuation=True, password_length=64),
        )
        suppress(secret, ("AwsSolutions-SMG4", rotation))
        return secret

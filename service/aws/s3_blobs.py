"""BlobStore on S3: the worker uploads results, clients fetch them through presigned URLs."""
from __future__ import annotations

from typing import Optional

from botocore.exceptions import ClientError

from ..ports import BlobStore
from .clients import AwsClient, error_code

_MISSING = {"NoSuchKey", "404", "NotFound"}
# Without s3:ListBucket (which the roles deliberately lack) S3 answers a missing key with 403.
_MISSING_OR_HIDDEN = _MISSING | {"403", "AccessDenied", "Forbidden"}


class S3BlobStore(BlobStore):
    def __init__(self, client: AwsClient, bucket: str):
        self._s3 = client
        self.bucket = bucket

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        try:
            data: bytes = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return data
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                raise KeyError(key) from None
            raise

    def size(self, key: str) -> Optional[int]:
        try:
            return int(self._s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if error_code(exc) in _MISSING_OR_HIDDEN:
                return None
            raise

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=key)  # S3 deletes are idempotent

    def copy(self, src: str, dst: str) -> None:
        """Server-side (CopyObject: the bytes never pass through here; one call up to 5 GB)."""
        try:
            self._s3.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src})
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                raise KeyError(src) from None
            raise

    def local_path(self, key: str) -> Optional[str]:
        return None

    def presigned_get_url(self, key: str, expires_seconds: int) -> Optional[str]:
        url: str = self._s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_seconds)
        )
        return url

    def presigned_put_url(self, key: str, content_type: str, expires_seconds: int) -> Optional[str]:
        """A URL the client PUTs the file body to, sending the same `Content-Type` header.

        This is the upload path for Lambda, whose request bodies are capped (6 MB): the API hands
        out the URL and the key, the client uploads straight to S3, then submits the key.
        """
        url: str = self._s3.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": key, "ContentType": content_type},
            ExpiresIn=int(expires_seconds),
        )
        return url

"""S3 blob store over moto's HTTP server: presigned GET and PUT URLs work without credentials."""
from __future__ import annotations

import httpx
import pytest

from service.aws import make_aws_backend
from service.aws.provision import provision
from tests.aws_support import aws_settings, moto_server


@pytest.fixture(scope="module")
def s3_backend(tmp_path_factory):
    with moto_server() as endpoint:
        settings = provision(aws_settings(tmp_path_factory.mktemp("s3"), aws_endpoint_url=endpoint))
        yield make_aws_backend(settings)


def test_presigned_get_url_serves_the_bytes(s3_backend):
    s3_backend.blobs.put("outputs/t1/1-0.wav", b"RIFF-audio-bytes", "audio/wav")
    url = s3_backend.blobs.presigned_get_url("outputs/t1/1-0.wav", 60)
    assert "X-Amz-Signature" in url and "Credential" in url
    resp = httpx.get(url)  # no AWS credentials on this request: the signature is the grant
    assert resp.status_code == 200 and resp.content == b"RIFF-audio-bytes"
    assert resp.headers["content-type"] == "audio/wav"
    assert s3_backend.blobs.local_path("outputs/t1/1-0.wav") is None


def test_presigned_put_url_uploads_a_file(s3_backend):
    url = s3_backend.blobs.presigned_put_url("uploads/t2/src_audio.wav", "audio/wav", 300)
    resp = httpx.put(url, content=b"client upload", headers={"Content-Type": "audio/wav"})
    assert resp.status_code == 200
    assert s3_backend.blobs.get("uploads/t2/src_audio.wav") == b"client upload"

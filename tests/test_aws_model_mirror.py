"""Model weights mirrored in S3 (moto): publish once, workers fetch in parallel, resume, never half."""
from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from service.aws import model_mirror

BUCKET = "acestep-test"


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def _model(root):
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "AceStepPipeline"}')
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 300)
    (root / "transformer" / "config.json").write_text("{}")
    return root


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_publish_then_fetch_gives_the_same_files(s3, tmp_path):
    source = _model(tmp_path / "src")
    total = sum(len(data) for data in _files(source).values())
    assert model_mirror.publish(s3, BUCKET, "acestep-v15-turbo", source) == total
    dest = tmp_path / "worker" / "acestep-v15-turbo"
    assert model_mirror.fetch(s3, BUCKET, "acestep-v15-turbo", dest) == total
    assert _files(dest) == _files(source)
    # a restarted worker whose disk kept the files fetches nothing
    assert model_mirror.fetch(s3, BUCKET, "acestep-v15-turbo", dest) == 0
    # a damaged file (wrong size) is fetched again
    (dest / "transformer" / "config.json").write_text("{broken")
    assert model_mirror.fetch(s3, BUCKET, "acestep-v15-turbo", dest) == 2
    assert _files(dest) == _files(source)


def test_a_model_without_manifest_is_not_fetched(s3, tmp_path):
    """The manifest is written last: a publish that died half way is invisible."""
    s3.put_object(Bucket=BUCKET, Key="models/half/model_index.json", Body=b"{}")
    assert model_mirror.fetch(s3, BUCKET, "half", tmp_path / "half") is None
    assert model_mirror.fetch(s3, BUCKET, "never-published", tmp_path / "x") is None
    assert not (tmp_path / "half").exists()


def test_a_short_download_leaves_no_file_that_looks_whole(s3, tmp_path):
    source = _model(tmp_path / "src")
    model_mirror.publish(s3, BUCKET, "m", source)
    s3.put_object(Bucket=BUCKET, Key="models/m/transformer/config.json", Body=b"{}{}")  # not what the manifest says
    with pytest.raises(OSError, match="expected 2"):
        model_mirror.fetch(s3, BUCKET, "m", tmp_path / "dest")
    assert not (tmp_path / "dest" / "transformer" / "config.json").exists()
    assert not list((tmp_path / "dest").rglob(".part-*"))


def test_an_aws_worker_loads_the_model_published_to_its_bucket(tmp_path):
    """The worker's start-up path: the bootstrap fetches each configured model from the mirror, then
    the engine loads it (here a tiny random-weight checkpoint, labelled as such)."""
    from engine.checkpoints import build_tiny_checkpoint
    from entrypoints import bootstrap
    from service.aws.clients import aws_client
    from tests.aws_support import aws_backend

    published = build_tiny_checkpoint(tmp_path / "build" / "acestep-v15-turbo")
    with aws_backend(tmp_path) as backend:
        settings = backend.settings.model_copy(update=dict(
            models_mirror=True, checkpoint_dir=str(tmp_path / "worker-disk"), allow_download=False,
            demo_if_missing=False))
        model_mirror.publish(aws_client("s3", settings), settings.bucket, "acestep-v15-turbo", published)
        engine = bootstrap.load_engine(settings)
    assert [m.name for m in engine.models()] == ["acestep-v15-turbo"]
    assert engine.models()[0].random_weights is True
    assert _files(tmp_path / "worker-disk" / "acestep-v15-turbo") == _files(published)


def test_models_cli_publishes_the_converted_layout(s3, tmp_path, capsys):
    from engine.checkpoints import build_tiny_checkpoint
    from entrypoints.models import main

    build_tiny_checkpoint(tmp_path / "ckpt" / "acestep-v15-turbo", layout="original")
    assert main(["publish", "acestep-v15-turbo", "--bucket", BUCKET, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    assert "published acestep-v15-turbo" in capsys.readouterr().out
    manifest = model_mirror.read_manifest(s3, BUCKET, "acestep-v15-turbo")
    assert "model_index.json" in manifest["files"] and "transformer/config.json" in manifest["files"]

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


def test_the_engines_hash_cache_is_not_published(s3, tmp_path):
    source = _model(tmp_path / "src")
    (source / ".transformer.fingerprint.json").write_text('{"version": 1, "files": {}}')
    (source / ".vae.fingerprint.json.tmp-x1y2").write_text('{"version"')  # a start killed while writing it
    model_mirror.publish(s3, BUCKET, "acestep-v15-turbo", source)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert not any(".fingerprint.json" in k for k in keys), keys
    assert any(k.endswith("transformer/config.json") for k in keys)


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
    from engine.weights.checkpoints import build_tiny_checkpoint
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


def test_models_cli_publishes_the_converted_layout(s3, tmp_path, capsys, monkeypatch):
    from engine.weights.checkpoints import DEMO_MARKER, build_tiny_checkpoint
    from entrypoints.models import main

    monkeypatch.chdir(tmp_path)  # no developer's .env
    dit = build_tiny_checkpoint(tmp_path / "ckpt" / "acestep-v15-turbo", layout="original")
    (dit / DEMO_MARKER).unlink()  # stands for real weights here
    assert main(["publish", "acestep-v15-turbo", "--bucket", BUCKET, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    assert "published acestep-v15-turbo" in capsys.readouterr().out
    manifest = model_mirror.read_manifest(s3, BUCKET, "acestep-v15-turbo")
    assert "model_index.json" in manifest["files"] and "transformer/config.json" in manifest["files"]
    assert DEMO_MARKER not in manifest["files"]


def _publish_fails(argv, capsys) -> str:
    from entrypoints.models import main

    capsys.readouterr()  # what building the fixtures printed
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_publish_refuses_random_weights(s3, tmp_path, capsys, monkeypatch, layout):
    from engine.weights.checkpoints import build_tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    build_tiny_checkpoint(tmp_path / "ckpt" / "acestep-v15-turbo", layout=layout)
    err = _publish_fails(["publish", "acestep-v15-turbo", "--bucket", BUCKET, "--checkpoint-dir",
                          str(tmp_path / "ckpt")], capsys)
    assert "refusing to publish acestep-v15-turbo" in err and "random weights" in err
    assert "acestep-models download acestep-v15-turbo" in err
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0  # nothing uploaded


def test_publish_downloads_a_missing_model_first(s3, tmp_path, capsys, monkeypatch):
    """infra/README: publish 'downloads and converts it if needed'. The hub is a local HTTP stand-in."""
    from engine.weights.model_sources import MAIN_REPO
    from entrypoints.models import main
    from tests.fake_hub import fake_hub, go_online, original_layout_repo

    monkeypatch.chdir(tmp_path)
    with fake_hub({MAIN_REPO: original_layout_repo(tmp_path / "hub", "acestep-v15-turbo")}) as hub:
        go_online(monkeypatch, hub.url)
        assert main(["publish", "acestep-v15-turbo", "--bucket", BUCKET, "--checkpoint-dir",
                     str(tmp_path / "ckpt")]) == 0
    assert hub.file_downloads()  # it came from the hub
    assert "downloading it first" in capsys.readouterr().out
    manifest = model_mirror.read_manifest(s3, BUCKET, "acestep-v15-turbo")
    assert "model_index.json" in manifest["files"] and "acestep_demo.json" not in manifest["files"]


def test_publish_errors_name_the_real_cause(s3, tmp_path, capsys, monkeypatch):
    from engine.weights.checkpoints import DEMO_MARKER, build_tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACESTEP_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _publish_fails(["publish", "acestep-v15-sft", "--bucket", BUCKET, "--checkpoint-dir",
                          str(tmp_path / "ckpt")], capsys)
    assert "HF_HUB_OFFLINE is set" in err and "ACESTEP_ALLOW_DOWNLOAD" not in err  # not a setting never set
    dit = build_tiny_checkpoint(tmp_path / "ckpt" / "acestep-v15-turbo")
    (dit / DEMO_MARKER).unlink()
    err = _publish_fails(["publish", "acestep-v15-turbo", "--bucket", "no-such-bucket", "--checkpoint-dir",
                          str(tmp_path / "ckpt")], capsys)
    assert "'no-such-bucket' does not exist" in err and "BucketName" in err

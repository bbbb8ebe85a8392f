"""service.sources: declared audio sources -> uploads and keys for submit_task, or a SourceError."""
from __future__ import annotations

import pytest

from service.sources import ResolvedSources, SentFile, ServerPath, SourceError, UploadKey, resolve_sources
from service.submission import Upload

MB = 1024 * 1024
PENDING = "uploads/pending/0123456789abcdef0123456789abcdef/song.wav"


class Blobs:
    """Only what resolve_sources asks a blob store: the size of a pending upload."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes

    def size(self, key: str):
        return self.sizes.get(key)


def resolve(*sources, blobs=None, allowed=(), max_bytes=MB) -> ResolvedSources:
    return resolve_sources(sources, blobs or Blobs({}), allowed_dirs=list(allowed), max_bytes=max_bytes)


def error(*sources, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        resolve(*sources, **kwargs)
    return info.value


def test_sent_file_is_stored_by_submission():
    up = Upload(b"RIFF", "a.wav", "audio/wav")
    assert resolve(SentFile("src_audio", up, "src_audio")) == ResolvedSources(uploads={"src_audio": up})


def test_pending_key_is_checked_and_handed_over():
    blobs = Blobs({PENDING: 10})
    assert resolve(UploadKey("reference_audio", PENDING, "ref_audio_key"), blobs=blobs).keys == \
        {"reference_audio": PENDING}
    err = error(UploadKey("src_audio", "outputs/t/0-0.mp3", "srcAudioKey"))
    assert err.kind == "invalid" and err.message.startswith("srcAudioKey: not an upload key")
    err = error(UploadKey("src_audio", PENDING, "src_audio_key"))
    assert err.kind == "invalid" and "nothing was uploaded" in err.message
    err = error(UploadKey("src_audio", PENDING, "src_audio_key"), blobs=Blobs({PENDING: MB + 1}))
    assert err.kind == "too_large" and err.message == "Upload 'src_audio_key' too large: the limit is 1 MB"


def test_server_path_inside_allowed_dirs(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "in.flac").write_bytes(b"fLaC")
    out = resolve(ServerPath("src_audio", str(allowed / "in.flac"), "src_audio_path"), allowed=[str(allowed)])
    assert out.uploads["src_audio"] == Upload(b"fLaC", "in.flac", "audio/flac")


def test_server_path_errors(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret.wav").write_bytes(b"x")
    (allowed / "link.wav").symlink_to(tmp_path / "secret.wav")
    (allowed / "big.wav").write_bytes(b"x" * (MB + 1))
    roots = [str(allowed)]
    for path in (str(tmp_path / "secret.wav"), str(allowed / "link.wav"), str(allowed / ".." / "secret.wav")):
        err = error(ServerPath("src_audio", path, "ctx_audio_path"), allowed=roots)
        assert err.kind == "invalid" and err.message.startswith("ctx_audio_path: server file paths are not accepted")
    assert error(ServerPath("src_audio", str(allowed / "none.wav"), "p"), allowed=roots).message == "p: file not found"
    assert error(ServerPath("src_audio", "a\x00b", "p"), allowed=roots).message == "p: not a valid file path"
    err = error(ServerPath("src_audio", str(allowed / "big.wav"), "p"), allowed=roots)
    assert err.kind == "too_large" and err.message == "p file too large: the limit is 1 MB"
    # No allowed dirs (the default): every path is refused.
    assert error(ServerPath("src_audio", str(allowed / "big.wav"), "p")).kind == "invalid"

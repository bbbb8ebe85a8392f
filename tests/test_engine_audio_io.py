"""Decoding uploads to 48 kHz stereo and encoding results, without external binaries."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.audio_io import decode_audio, encode_audio, resample
from engine.types import GenerationError


def _encode(data: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("sr", [44100, 22050, 16000, 96000])
def test_resample_keeps_a_tone_and_the_length(sr):
    t = np.arange(sr) / sr
    x = torch.tensor(np.sin(2 * np.pi * 440 * t)[None], dtype=torch.float32)
    y = resample(x, sr, 48000)[0].numpy()
    assert y.shape[0] == 48000
    ref = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)
    assert np.abs(y - ref)[1000:-1000].max() < 1e-3


def test_resample_removes_content_above_the_new_nyquist():
    t = np.arange(44100) / 44100
    x = torch.tensor(np.sin(2 * np.pi * 15000 * t)[None], dtype=torch.float32)  # above 8 kHz Nyquist
    assert resample(x, 44100, 16000)[0, 500:-500].abs().max() < 0.01


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decode_common_formats_to_48k_stereo(fmt):
    sr = 44100
    mono = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr * 2) / sr)).astype("float32")
    audio = decode_audio(_encode(mono, sr, fmt), "src_audio")
    assert audio.shape[0] == 2 and audio.dtype == torch.float32
    assert abs(audio.shape[1] - 96000) <= 2400  # lossy codecs pad a few frames
    assert torch.equal(audio[0], audio[1])  # mono duplicated
    assert 0.2 < audio.abs().max() < 0.4


def test_decode_aac_results_as_sources():  # a result in aac can be the next task's src_audio
    sr = 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr * 2) / sr)).astype("float32")
    audio = decode_audio(encode_audio(np.stack([tone, tone]), "aac", sr), "src_audio")
    assert audio.shape[0] == 2 and abs(audio.shape[1] - 96000) <= 4096 and 0.2 < audio.abs().max() < 0.4
    for broken in (b"\xff\xf1" + b"\x00" * 500, b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 500):  # magic, no audio
        with pytest.raises(GenerationError, match=r"^(could not decode )?src_audio"):
            decode_audio(broken, "src_audio")
    with pytest.raises(GenerationError, match="src_audio is 2 s long; the limit is 1 s"):
        decode_audio(encode_audio(np.stack([tone, tone]), "aac", sr), "src_audio", max_seconds=1)


def test_decode_rejects_garbage_empty_and_too_long():
    with pytest.raises(GenerationError, match="could not decode reference_audio"):
        decode_audio(b"\x00\x01garbage" * 100, "reference_audio")
    with pytest.raises(GenerationError, match="empty"):
        decode_audio(b"", "src_audio")
    long = _encode(np.zeros(8000 * 11, dtype="float32"), 8000, "WAV")
    with pytest.raises(GenerationError, match="src_audio is 11 s long; the limit is 10 s"):
        decode_audio(long, "src_audio", max_seconds=10)


def _read_aac(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, container.format.name) == ("aac", "aac")  # AAC in ADTS
        frames = [f.to_ndarray() for f in container.decode(stream)]  # planar float [channels, n] per frame
        return np.concatenate(frames, axis=1).T, stream.rate


# (format, container magic, subtype libsndfile reads back)
@pytest.mark.parametrize("fmt,magic,subtype", [("mp3", None, "MPEG_LAYER_III"), ("wav", b"RIFF", "PCM_16"),
                                               ("flac", b"fLaC", "PCM_16"), ("wav32", b"RIFF", "FLOAT"),
                                               ("opus", b"OggS", "OPUS"), ("aac", b"\xff\xf1", None)])
def test_encode_round_trips(fmt, magic, subtype):
    audio = (0.5 * np.sin(2 * np.pi * 330 * np.arange(48000 * 3) / 48000)).astype("float32")
    data = encode_audio(np.stack([audio, -audio]), fmt)
    assert magic is None or data.startswith(magic)
    if fmt == "aac":
        back, sr = _read_aac(data)
    else:
        assert sf.info(io.BytesIO(data)).subtype == subtype
        back, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert sr == 48000 and back.shape[1] == 2
    assert abs(back.shape[0] - 48000 * 3) <= 2048 + 1920  # lossy codecs add priming and padding frames
    assert np.corrcoef(back[:, 0], back[:, 1])[0, 1] < -0.9  # channels kept apart
    if fmt == "wav32":  # 32-bit float keeps the samples exactly
        assert np.array_equal(back[:, 0], audio)


def test_encode_rejects_unknown_formats_and_rates_opus_cannot_code():
    with pytest.raises(GenerationError, match="unsupported audio_format"):
        encode_audio(np.zeros((2, 10), dtype="float32"), "m4a")
    with pytest.raises(GenerationError, match="opus codes .* not 44100 Hz"):
        encode_audio(np.zeros((2, 441), dtype="float32"), "opus", 44100)

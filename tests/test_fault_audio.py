"""Hostile audio: NaN samples, decode bombs (odd rates, many channels, lying headers), and NaN from the model.

Each case once crashed or exhausted a worker (issue 11); now each is a clear task error.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from engine.audio_io import MAX_CHANNELS, decode_audio, encode_audio
from engine.types import GenerationError


def _wav(data: np.ndarray, sr: int, subtype: str = "FLOAT", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_one_nan_sample_in_a_source_is_refused_at_decode():
    data = np.zeros((4800, 2), dtype="float32")
    data[100, 1] = np.nan
    with pytest.raises(GenerationError, match="src_audio contains NaN or infinite samples"):
        decode_audio(_wav(data, 48000), "src_audio")
    data[100, 1] = np.inf
    with pytest.raises(GenerationError, match="reference_audio contains NaN"):
        decode_audio(_wav(data, 48000), "reference_audio")


def test_non_finite_audio_never_reaches_the_encoder():
    # libsndfile's mp3 encoder aborts the whole process on NaN; reaching this line proves it was not called.
    bad = np.zeros((2, 4800), dtype="float32")
    bad[0, 7] = np.nan
    for fmt in ("mp3", "wav", "flac"):
        with pytest.raises(GenerationError, match="NaN or infinite"):
            encode_audio(bad, fmt)


def test_a_rate_sharing_no_factor_with_48k_decodes_cheaply():
    # 926 bytes at 44,101 Hz once built a 16.9 GB resampling kernel.
    tone = (0.3 * np.sin(np.arange(220) / 5)).astype("float32")
    data = _wav(tone, 44101, subtype="PCM_16")
    assert len(data) < 1000
    audio = decode_audio(data, "src_audio")
    assert audio.shape[0] == 2 and abs(audio.shape[1] - round(220 * 48000 / 44101)) <= 2


@pytest.mark.parametrize("sr", [4001, 200000])
def test_sample_rates_out_of_range_are_refused_from_the_header(sr):
    data = _wav(np.zeros(4000, dtype="float32"), sr, subtype="PCM_16")
    with pytest.raises(GenerationError, match=f"sample rate of {sr} Hz; accepted: 8000-192000 Hz"):
        decode_audio(data, "src_audio")


def test_too_many_channels_are_refused_from_the_header():
    data = _wav(np.zeros((100, MAX_CHANNELS + 1), dtype="float32"), 48000, subtype="PCM_16")
    with pytest.raises(GenerationError, match=f"{MAX_CHANNELS + 1} channels; accepted: 1-{MAX_CHANNELS}"):
        decode_audio(data, "src_audio")


def test_eight_channel_192k_flac_decodes_to_bounded_stereo():
    # A 954 KB 8-channel 192 kHz FLAC once took 10.1 GB; blockwise decoding keeps only 48 kHz stereo.
    n = 192000 // 2
    data = np.zeros((n, 8), dtype="float32")
    data[:, 0] = 0.25
    audio = decode_audio(_wav(data, 192000, subtype="PCM_16", fmt="FLAC"), "src_audio")
    assert audio.shape == (2, 24000) and float(audio[0, 1000:-1000].mean()) == pytest.approx(0.25, abs=1e-3)


def test_a_header_claiming_hours_decodes_only_the_bytes_present():
    # A WAV whose data chunk claims ~22 hours of 48 kHz stereo 16-bit but holds 1024 frames.
    header = b"RIFF" + struct.pack("<I", 0xFFFFFFF0) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, 48000, 48000 * 4, 4, 16)
    header += b"data" + struct.pack("<I", 0xFFFFFF00)
    audio = decode_audio(header + b"\x00" * 4096, "src_audio")
    assert audio.shape == (2, 1024)


def test_decoded_length_is_bounded_even_when_the_header_does_not_say():
    data = _wav(np.zeros(8000 * 3, dtype="float32"), 8000, subtype="PCM_16")
    with pytest.raises(GenerationError, match="the limit is 2 s|2 s"):
        decode_audio(data, "src_audio", max_seconds=2)

"""Encoding generated audio to mp3/wav/flac bytes, torch-free.

Kept apart from engine.audio_io (which needs torch for decoding) so the worker's encoder processes
(service/encoder_pool.py) import only numpy and soundfile.
"""
from __future__ import annotations

import io
import time

import numpy as np
import soundfile as sf

from engine.types import EncodedAudio, GenerationError, PendingAudio

_WRITE_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", None)}


def check_finite(audio: np.ndarray, what: str = "generated audio") -> None:
    if not np.isfinite(audio).all():
        raise GenerationError(f"the model produced NaN or infinite samples in the {what} (numerical overflow, "
                              "e.g. fp16 on this GPU); try ACESTEP_DTYPE=bfloat16 or float32, or another seed")


def encode_audio(audio: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    """Encode float audio [channels, samples] in [-1, 1] to mp3 / wav / flac bytes."""
    if fmt not in _WRITE_FORMATS:
        raise GenerationError(f"unsupported audio_format {fmt!r}; use mp3, wav or flac")
    container, subtype = _WRITE_FORMATS[fmt]
    data = np.asarray(audio, dtype=np.float32)
    check_finite(data)  # never hand NaN to the encoder: the mp3 encoder aborts the process
    buf = io.BytesIO()
    sf.write(buf, np.clip(data.T, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def encode_pending(pending: PendingAudio) -> tuple[EncodedAudio, float]:
    """The encoded file and the seconds encoding took (run in an encoder process)."""
    t0 = time.perf_counter()
    data = encode_audio(pending.samples, pending.format, pending.sample_rate)
    return (EncodedAudio(data=data, format=pending.format, sample_rate=pending.sample_rate,
                         channels=pending.channels, duration_seconds=pending.duration_seconds, seed=pending.seed),
            time.perf_counter() - t0)

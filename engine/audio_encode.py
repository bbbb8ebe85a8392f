"""Encoding generated audio to the output formats' bytes, torch-free.

Kept apart from engine.audio_io (which needs torch for decoding) so the worker's encoder processes
(service/encoder_pool.py) import only numpy, soundfile and (for AAC) PyAV.

mp3, wav (16-bit PCM), wav32 (32-bit float WAV), flac and opus (in Ogg) go through libsndfile; AAC (in ADTS,
the `.aac` file upstream writes) through FFmpeg's native encoder, which PyAV's wheels bundle.
"""
from __future__ import annotations

import io
import time

import numpy as np
import soundfile as sf

from engine.types import EncodedAudio, GenerationError, PendingAudio

# format -> (libsndfile container, subtype); None: libsndfile's default for the container
_SOUNDFILE_FORMATS = {"wav": ("WAV", "PCM_16"), "wav32": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_16"),
                      "mp3": ("MP3", None), "opus": ("OGG", "OPUS")}
OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates Opus codes
AAC_BIT_RATE = 192_000  # per stereo pair; FFmpeg's default (128k) audibly smears cymbals


def check_finite(audio: np.ndarray, what: str = "generated audio") -> None:
    if not np.isfinite(audio).all():
        raise GenerationError(f"the model produced NaN or infinite samples in the {what} (numerical overflow, "
                              "e.g. fp16 on this GPU); try ACESTEP_DTYPE=bfloat16 or float32, or another seed")


def encode_audio(audio: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    """Encode float audio [channels, samples] in [-1, 1] to `fmt` bytes (engine.request's audio formats)."""
    if fmt not in _SOUNDFILE_FORMATS and fmt != "aac":
        raise GenerationError(f"unsupported audio_format {fmt!r}; use mp3, wav, wav32, flac, opus or aac")
    if fmt == "opus" and sample_rate not in OPUS_SAMPLE_RATES:
        raise GenerationError(f"opus codes {', '.join(map(str, OPUS_SAMPLE_RATES))} Hz audio, not {sample_rate} Hz")
    data = np.asarray(audio, dtype=np.float32)
    check_finite(data)  # never hand NaN to an encoder: the mp3 encoder aborts the process
    data = np.clip(data, -1.0, 1.0)
    if fmt == "aac":
        return _aac(data, sample_rate)
    container, subtype = _SOUNDFILE_FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, data.T, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def _aac(audio: np.ndarray, sample_rate: int) -> bytes:
    import av  # only AAC needs FFmpeg: the other formats never load it

    channels = audio.shape[0]
    if channels not in (1, 2):
        raise GenerationError(f"aac output takes mono or stereo audio, not {channels} channels")
    layout = "stereo" if channels == 2 else "mono"
    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout=layout)
        stream.bit_rate = AAC_BIT_RATE * channels // 2
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):  # PyAV cuts the frame to the encoder's 1024-sample frames
            container.mux(packet)
        for packet in stream.encode(None):  # flush
            container.mux(packet)
    return buf.getvalue()


def encode_pending(pending: PendingAudio) -> tuple[EncodedAudio, float]:
    """The encoded file and the seconds encoding took (run in an encoder process)."""
    t0 = time.perf_counter()
    data = encode_audio(pending.samples, pending.format, pending.sample_rate)
    return (EncodedAudio(data=data, format=pending.format, sample_rate=pending.sample_rate,
                         channels=pending.channels, duration_seconds=pending.duration_seconds, seed=pending.seed),
            time.perf_counter() - t0)

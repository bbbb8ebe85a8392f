"""Audio in and out: decode uploaded bytes to 48 kHz stereo, encode generated audio to mp3/wav/flac.

Everything goes through soundfile (libsndfile, which reads wav/flac/ogg/mp3 and writes mp3) and a windowed-sinc
resampler in torch, so no external binary (ffmpeg) is needed.
"""
from __future__ import annotations

import io
import math

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from engine.types import GenerationError

SAMPLE_RATE = 48000
MAX_SOURCE_SECONDS = 600.0

_WRITE_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", None)}


def decode_audio(data: bytes, what: str = "audio", max_seconds: float = MAX_SOURCE_SECONDS) -> torch.Tensor:
    """Decode wav/flac/mp3/ogg bytes to a float32 tensor [2, samples] at 48 kHz.

    Raises GenerationError naming `what` (e.g. "src_audio") when the bytes are not audio or are too long.
    """
    if not data:
        raise GenerationError(f"could not decode {what}: the file is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            if f.frames > 0 and f.frames / sr > max_seconds:  # checked before reading a huge file into memory
                raise GenerationError(f"{what} is {f.frames / sr:.0f} s long; the limit is {max_seconds:.0f} s")
            samples = f.read(dtype="float32", always_2d=True)
    except GenerationError:
        raise
    except Exception as exc:  # libsndfile reports every unreadable input as a generic error
        raise GenerationError(f"could not decode {what}: {exc} (supported: wav, flac, mp3, ogg)") from exc
    if samples.shape[0] == 0:
        raise GenerationError(f"could not decode {what}: it contains no audio samples")
    if samples.shape[0] / sr > max_seconds:  # mp3 frame counts can be unknown up front
        raise GenerationError(f"{what} is {samples.shape[0] / sr:.0f} s long; the limit is {max_seconds:.0f} s")
    audio = torch.from_numpy(np.ascontiguousarray(samples.T))
    audio = to_stereo(audio)
    return resample(audio, sr, SAMPLE_RATE)


def to_stereo(audio: torch.Tensor) -> torch.Tensor:
    if audio.shape[0] == 2:
        return audio
    if audio.shape[0] == 1:
        return audio.repeat(2, 1)
    return audio[:2]  # more than two channels: keep front left/right


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 16) -> torch.Tensor:
    """Band-limited resampling of [channels, samples] with a Hann-windowed sinc, polyphase over gcd-reduced rates."""
    if orig_sr == new_sr:
        return audio
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    cutoff = min(up, down) / down  # low-pass at the lower Nyquist, as a fraction of the input Nyquist
    reach = zero_crossings / cutoff  # kernel half-width in input samples
    width = math.ceil(reach)
    # Output sample (m*up + p) sits at input position m*down + p*down/up; frame m of the strided conv sees inputs
    # m*down + j - width, so kernel[p, j] weighs an input at distance d = (j - width) - p*down/up.
    j = torch.arange(2 * width + down, dtype=torch.float64)[None, :]
    d = (j - width) - torch.arange(up, dtype=torch.float64)[:, None] * down / up
    window = torch.where(d.abs() <= reach, torch.cos(math.pi * d / (2 * reach)) ** 2, torch.zeros_like(d))
    kernel = (cutoff * torch.sinc(cutoff * d) * window).to(torch.float32)[:, None, :]
    x = F.pad(audio[:, None, :], (width, width + down))
    y = F.conv1d(x, kernel, stride=down)  # [channels, up, frames]
    y = y.transpose(1, 2).reshape(audio.shape[0], -1)
    target = math.ceil(audio.shape[-1] * new_sr / orig_sr)
    return y[:, :target].contiguous()


def pad_or_trim(audio: torch.Tensor, start_pad: int, end_pad: int) -> torch.Tensor:
    """Add silence before/after (outpainting) so a repaint window past the source ends is inside the audio."""
    if start_pad <= 0 and end_pad <= 0:
        return audio
    return F.pad(audio, (max(start_pad, 0), max(end_pad, 0)))


def encode_audio(audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode float audio [channels, samples] in [-1, 1] to mp3 / wav / flac bytes."""
    if fmt not in _WRITE_FORMATS:
        raise GenerationError(f"unsupported audio_format {fmt!r}; use mp3, wav or flac")
    container, subtype = _WRITE_FORMATS[fmt]
    buf = io.BytesIO()
    data = np.clip(np.asarray(audio, dtype=np.float32).T, -1.0, 1.0)
    sf.write(buf, data, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()

"""Audio in and out: decode uploaded bytes to 48 kHz stereo, encode generated audio (engine.audio_encode).

Decoding goes through soundfile (libsndfile: wav/flac/ogg/opus/mp3) and soxr (libsoxr, a maintained
resampler), so no external binary (ffmpeg) is needed; AAC (ADTS, as this service writes it, or in M4A)
goes through FFmpeg's AAC decoder in PyAV's wheel, its demuxer chosen from the magic bytes, never guessed.
Uploads are hostile input: the header is
checked (channels, sample rate, length) before anything is decoded, decoding runs block by block
(memory bounded by the 48 kHz stereo output, whatever the input's rate or channel count), and
NaN/inf samples are refused. Encoding refuses non-finite audio too: libsndfile's mp3 encoder
aborts the process on NaN.
"""
from __future__ import annotations

import io
import itertools
from typing import Iterable, Iterator, Optional

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F

from engine import audio_encode
from engine.audio_encode import check_finite  # noqa: F401  (re-exported: engine.audio_io.check_finite)
from engine.types import GenerationError

SAMPLE_RATE = 48000
MAX_SOURCE_SECONDS = 600.0
MAX_CHANNELS = 8
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
# Input frames x channels the header may announce: 600 s of 96 kHz stereo. Decoding is blockwise, so
# this bounds decode time, not memory.
MAX_DECODED_SAMPLES = int(MAX_SOURCE_SECONDS * 96000 * 2)
_BLOCK_FRAMES = 1 << 16
SUPPORTED = "wav, flac, mp3, ogg, opus, aac, m4a"



def decode_audio(data: bytes, what: str = "audio", max_seconds: float = MAX_SOURCE_SECONDS) -> torch.Tensor:
    """Decode wav/flac/mp3/ogg bytes to a float32 tensor [2, samples] at 48 kHz.

    Raises GenerationError naming `what` (e.g. "src_audio") when the bytes are not audio, announce
    too many channels, a sample rate out of range or too many samples, are too long, or contain
    NaN/inf samples.
    """
    if not data:
        raise GenerationError(f"could not decode {what}: the file is empty")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as exc:  # libsndfile reports every unreadable input as a generic error
        demuxer = _aac_demuxer(data)
        if demuxer is None:
            raise GenerationError(f"could not decode {what}: {exc} (supported: {SUPPORTED})") from exc
        blocks = _decode_aac(data, demuxer, what, max_seconds)
    else:
        with f:
            check_header(what, f.samplerate, f.channels, f.frames, max_seconds)
            blocks = _resampled(_sf_blocks(f, what), f.samplerate, f.channels, what, max_seconds)
    if not blocks:
        raise GenerationError(f"could not decode {what}: it contains no audio samples")
    return to_stereo(torch.from_numpy(np.ascontiguousarray(np.concatenate(blocks).T)))


def check_header(what: str, sample_rate: int, channels: int, frames: int, max_seconds: float) -> None:
    """Refuse what the header announces before a sample is decoded."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise GenerationError(f"{what} has a sample rate of {sample_rate} Hz; "
                              f"accepted: {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise GenerationError(f"{what} has {channels} channels; accepted: 1-{MAX_CHANNELS}")
    if frames > 0 and frames / sample_rate > max_seconds:
        raise GenerationError(f"{what} is {frames / sample_rate:.0f} s long; the limit is {max_seconds:.0f} s")
    if frames * channels > MAX_DECODED_SAMPLES:
        raise GenerationError(f"{what} holds {frames * channels} samples; the limit is {MAX_DECODED_SAMPLES}")


def _sf_blocks(f: sf.SoundFile, what: str) -> Iterator[np.ndarray]:
    while True:
        try:
            block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
        except Exception as exc:
            raise GenerationError(f"could not decode {what}: {exc} (supported: {SUPPORTED})") from exc
        yield block
        if len(block) < _BLOCK_FRAMES:
            return


def _aac_demuxer(data: bytes) -> Optional[str]:
    """FFmpeg's demuxer for AAC bytes: ADTS frames (sync word 0xFFF, layer 0) or an MP4/M4A file; None else."""
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0:
        return "aac"
    return "mov" if data[4:8] == b"ftyp" else None


def _decode_aac(data: bytes, demuxer: str, what: str, max_seconds: float) -> list[np.ndarray]:
    import av  # FFmpeg: only for AAC, the one format libsndfile lacks

    try:
        with av.open(io.BytesIO(data), format=demuxer) as container:
            if not container.streams.audio:
                raise GenerationError(f"could not decode {what}: no audio stream (supported: {SUPPORTED})")
            stream = container.streams.audio[0]
            if stream.codec_context.name != "aac":
                raise GenerationError(f"could not decode {what}: {stream.codec_context.name} audio in an MP4 "
                                      f"(supported: {SUPPORTED})")
            rate, channels = stream.rate, stream.channels
            frames = int((container.duration or 0) * rate / 1_000_000)
            check_header(what, rate, channels, frames, max_seconds)
            # the AAC decoder writes planar float: [channels, n] per frame
            blocks = (np.ascontiguousarray(frame.to_ndarray().T, dtype=np.float32)
                      for frame in container.decode(stream))
            return _resampled(blocks, rate, channels, what, max_seconds)
    except av.FFmpegError as exc:
        raise GenerationError(f"could not decode {what}: {exc} (supported: {SUPPORTED})") from exc


def _resampled(blocks: Iterable[np.ndarray], sr: int, channels: int, what: str,
               max_seconds: float) -> list[np.ndarray]:
    """[samples, 2] float32 blocks at 48 kHz from [samples, channels] blocks at `sr`; stops as soon as the
    output passes max_seconds (an mp3's frame count can be unknown or wrong in its header)."""
    stream = soxr.ResampleStream(sr, SAMPLE_RATE, 2, dtype="float32", quality="HQ") if sr != SAMPLE_RATE else None
    limit = int(max_seconds * SAMPLE_RATE) + 1
    out: list[np.ndarray] = []
    total, frames_read = 0, 0
    for block in itertools.chain(blocks, [None]):
        last = block is None
        if block is None:  # the end: what the resampler holds
            block = np.zeros((0, 2), dtype=np.float32)
        frames_read += len(block)
        if frames_read * channels > MAX_DECODED_SAMPLES:
            raise GenerationError(f"{what} holds more than {MAX_DECODED_SAMPLES} samples")
        if not np.isfinite(block).all():
            raise GenerationError(f"{what} contains NaN or infinite samples; send finite audio")
        stereo = _first_two_channels(block) if len(block) else block
        chunk = stream.resample_chunk(stereo, last=last) if stream is not None else stereo
        if len(chunk):
            out.append(np.asarray(chunk, dtype=np.float32))
            total += len(chunk)
        if total > limit:
            raise GenerationError(f"{what} is longer than the limit of {max_seconds:.0f} s")
    return out


def _first_two_channels(block: np.ndarray) -> np.ndarray:
    if block.shape[1] == 1:
        return np.repeat(block, 2, axis=1)
    return np.ascontiguousarray(block[:, :2])  # more than two channels: keep front left/right


def to_stereo(audio: torch.Tensor) -> torch.Tensor:
    if audio.shape[0] == 2:
        return audio
    if audio.shape[0] == 1:
        return audio.repeat(2, 1)
    return audio[:2]


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample [channels, samples] with soxr (band-limited, linear-phase, 'HQ')."""
    if orig_sr == new_sr:
        return audio
    y = soxr.resample(audio.detach().cpu().numpy().T.astype(np.float32), orig_sr, new_sr, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(np.asarray(y, dtype=np.float32).reshape(len(y), -1).T))


def pad_or_trim(audio: torch.Tensor, start_pad: int, end_pad: int) -> torch.Tensor:
    """Add silence before/after (outpainting) so a repaint window past the source ends is inside the audio."""
    if start_pad <= 0 and end_pad <= 0:
        return audio
    return F.pad(audio, (max(start_pad, 0), max(end_pad, 0)))


def encode_audio(audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode float audio [channels, samples] in [-1, 1] to bytes of one of the output formats."""
    return audio_encode.encode_audio(audio, fmt, sample_rate)

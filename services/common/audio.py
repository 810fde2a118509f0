"""Audio in and out: voice prompts to 24 kHz mono as the reference prepares them, and streaming encoders."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 24000
MAX_VOICE_SECONDS = 60.0
MAX_VOICE_BYTES = 10 * 1024 * 1024
TARGET_DBFS = -25.0
FORMATS = ("pcm16", "pcm_f32", "wav", "flac", "ogg_opus")
MEDIA_TYPES = {
    "pcm16": f"audio/L16;rate={SAMPLE_RATE};channels=1",
    "pcm_f32": f"audio/x-float32le;rate={SAMPLE_RATE};channels=1",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg_opus": "audio/ogg;codecs=opus",
}


class AudioError(ValueError):
    """A voice file that cannot be used; the message is the user-facing reason."""


def decode_voice(data: bytes) -> np.ndarray:
    """WAV, FLAC or Ogg bytes, any rate, mono or multi-channel -> float32 mono at 24 kHz."""
    if not data:
        raise AudioError("empty voice file")
    if len(data) > MAX_VOICE_BYTES:
        raise AudioError(f"voice file is {len(data) / 2**20:.1f} MB; the limit is {MAX_VOICE_BYTES // 2**20} MB")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            seconds = f.frames / f.samplerate
            if seconds > MAX_VOICE_SECONDS:
                raise AudioError(f"voice is {seconds:.1f} s long; the limit is {MAX_VOICE_SECONDS:.0f} s")
            rate = f.samplerate
            samples = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise AudioError(f"not a WAV, FLAC or Ogg audio file ({e.error_string})") from e
    if samples.shape[0] == 0:
        raise AudioError("voice file has no samples")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def normalize_voice(samples: np.ndarray) -> np.ndarray:
    """-25 dBFS RMS, then divided by the peak if above 1: the reference feature extractor's float32 math."""
    x = torch.tensor(samples, dtype=torch.float32)
    rms = torch.sqrt(torch.mean(x**2))
    x *= 10 ** (TARGET_DBFS / 20) / (rms + 1e-6)
    peak = torch.max(torch.abs(x))
    if peak > 1.0:
        x = x / (peak + 1e-6)
    return x.numpy()


def _wav_header(sample_rate: int) -> bytes:
    # A streaming WAV: the RIFF and data sizes are unknown up front and marked 0xFFFFFFFF, the usual
    # convention for WAV streams; readers take the data to run to the end of the file.
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", unknown)
    )


def _pcm16(samples: np.ndarray) -> bytes:
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class _Sink(io.RawIOBase):
    """A write-only file for libsndfile that hands out what has been written so far."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        end = self.position + len(data)
        if self.position > len(self.buffer):
            self.buffer.extend(bytes(self.position - len(self.buffer)))
        self.buffer[self.position : end] = data
        self.position = end
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.buffer)}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position


class StreamEncoder:
    """Encodes float32 mono samples chunk by chunk; header() + encode()s + finish() is a whole file."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._sink: _Sink | None = None
        self._file: sf.SoundFile | None = None
        self._sent = 0
        if fmt in ("flac", "ogg_opus"):
            self._sink = _Sink()
            container, subtype = ("FLAC", "PCM_16") if fmt == "flac" else ("OGG", "OPUS")
            self._file = sf.SoundFile(
                self._sink, "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
            )

    def header(self) -> bytes:
        return _wav_header(self.sample_rate) if self.fmt == "wav" else b""

    def _drain(self) -> bytes:
        # Bytes below the sink's current end are final unless libsndfile seeks back to patch a header, which
        # it does only when closing; those patches land in the first bytes, already sent, so FLAC and Ogg
        # streams keep their streaming-safe header values.
        data = bytes(self._sink.buffer[self._sent :])
        self._sent = len(self._sink.buffer)
        return data

    def encode(self, samples: np.ndarray) -> bytes:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.fmt == "pcm_f32":
            return samples.astype("<f4").tobytes()
        if self.fmt in ("pcm16", "wav"):
            return _pcm16(samples)
        self._file.write(samples)
        return self._drain()

    def finish(self) -> bytes:
        if self._file is None:
            return b""
        self._file.close()
        self._file = None
        return self._drain()

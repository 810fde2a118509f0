"""Audio in and out: voice files decoded to 24 kHz mono as the reference decodes them (its loudness normalisation is
the acoustic service's, `services/acoustic/voice_prompts.py`), and streaming encoders."""

from __future__ import annotations

import hashlib
import io
import struct

import numpy as np
import soundfile as sf
import soxr

from services.common.frames import FRAME_MS, MAX_VOICE_SECONDS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: F401

MAX_VOICE_BYTES = 10 * 1024 * 1024
# Voice sample rates accepted: the header's claim is checked before any sample is read, as resampling from an
# absurd rate (a WAV header may say 2 GHz) costs seconds of CPU for a few samples of output.
MIN_VOICE_RATE = 8000
MAX_VOICE_RATE = 192000

FORMATS = ("pcm16", "pcm_f32", "wav", "flac", "ogg_opus")
MEDIA_TYPES: dict[str, str] = {
    # Our pcm16 is little-endian although RFC 2586 defines L16 as big-endian: clients go by the API docs.
    "pcm16": f"audio/L16;rate={SAMPLE_RATE};channels=1",
    "pcm_f32": f"audio/x-float32le;rate={SAMPLE_RATE};channels=1",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg_opus": "audio/ogg;codecs=opus",
}

# The containers decode_voice accepts: libsndfile reads more (AIFF, CAF, ...), but the API promises these.
_VOICE_CONTAINERS = {"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3"}
# Containers whose frame count libsndfile estimates (an MP3 without a Xing/LAME header: from its size and first
# frame's bit rate): only the samples actually read are held to the length limit.
_ESTIMATED_FRAMES = {"MP3"}
_NOT_AUDIO = "not a WAV, FLAC, Ogg or MP3 audio file"
# libsndfile reports this frame count when the header does not say (a streamed FLAC, an Ogg without an end).
_UNKNOWN_FRAMES = 2**63 - 1
_READ_BLOCK = 1 << 16  # frames per read; a fixed size, as a header may claim any sample rate


class AudioError(ValueError):
    """A voice file that cannot be used; str(err) is a precise, user-facing reason."""


def _reason(e: sf.SoundFileError) -> str:
    # libsndfile's own words, without soundfile's "Error opening <_io.BytesIO object at 0x...>: " prefix.
    return "libsndfile: " + getattr(e, "error_string", str(e)).rstrip(".")


def _read_mono(f: sf.SoundFile, limit: int) -> np.ndarray:
    """Up to limit + 1 frames, mixed down block by block so memory stays that of 60 s of mono audio."""
    block = np.empty((_READ_BLOCK, f.channels), dtype=np.float32)
    parts: list[np.ndarray] = []
    total = 0
    while total <= limit:
        block.fill(np.nan)
        try:
            n = len(f.read(out=block))
            at_end = n < len(block)
        except sf.SoundFileError as e:
            # soundfile seeks to the new position after each read, and libFLAC cannot seek to the very end
            # of a FLAC whose length is unknown (our own streamed FLAC, ffmpeg's piped FLAC), so the last read
            # raises with its samples already in `block`. Decoders of these formats never produce NaN, so the
            # first NaN marks where the samples end.
            if f.frames != _UNKNOWN_FRAMES:
                raise AudioError(f"the {f.format} file's audio data cannot be decoded ({_reason(e)})") from e
            nan_rows = np.isnan(block[:, 0])
            n, at_end = (int(nan_rows.argmax()) if nan_rows.any() else len(block)), True
        frames = block[:n]
        # One channel is kept as read, bit for bit; more are averaged.
        parts.append(frames[:, 0].copy() if f.channels == 1 else frames.mean(axis=1, dtype=np.float32))
        total += n
        if at_end:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def decode_voice(data: bytes) -> np.ndarray:
    """WAV, FLAC, Ogg (Vorbis/Opus) or MP3 bytes, any rate, any channel count -> float32 mono at 24 kHz."""
    if not data:
        raise AudioError("the voice file is empty")
    # Checked before decoding so an oversized upload costs nothing.
    if len(data) > MAX_VOICE_BYTES:
        raise AudioError(
            f"the voice file is {len(data)} bytes; the size limit is {MAX_VOICE_BYTES} bytes "
            f"({MAX_VOICE_BYTES // 2**20} MiB)"
        )
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except sf.SoundFileError as e:
        raise AudioError(f"{_NOT_AUDIO} ({_reason(e)})") from e
    with f:
        if f.format not in _VOICE_CONTAINERS:
            raise AudioError(f"{_NOT_AUDIO} (it is {f.format_info})")
        rate = f.samplerate
        if not MIN_VOICE_RATE <= rate <= MAX_VOICE_RATE:
            raise AudioError(
                f"the voice file's sample rate is {rate} Hz; the supported range is "
                f"{MIN_VOICE_RATE} to {MAX_VOICE_RATE} Hz"
            )
        limit = int(MAX_VOICE_SECONDS * rate)
        if f.frames != _UNKNOWN_FRAMES and f.frames > limit and f.format not in _ESTIMATED_FRAMES:
            seconds = f.frames / rate
            raise AudioError(f"the voice is {seconds:.1f} s long; the limit is {MAX_VOICE_SECONDS:g} s")
        mono = _read_mono(f, limit)
    if len(mono) > limit:
        raise AudioError(f"the voice is longer than the limit of {MAX_VOICE_SECONDS:g} s")
    if len(mono) == 0:
        raise AudioError("the voice file has no audio samples")
    if not np.isfinite(mono).all():
        raise AudioError("the voice file has NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
        if len(mono) == 0:  # a sample or two at a high rate is less than one sample at 24 kHz
            raise AudioError(f"the voice is too short: no samples left at {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(mono, dtype=np.float32)


def voice_digest(samples: np.ndarray) -> bytes:
    """The SHA-256 of a voice's float32 samples as EncodeVoice carries them: the acoustic service's voice cache
    key, and what a caller sends instead of samples it has sent before (EncodeVoiceRequest.voice_digests)."""
    return hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32)).digest()


def _pcm16(samples: np.ndarray) -> bytes:
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def _wav_header(sample_rate: int) -> bytes:
    # The length is unknown when the header goes out, so the RIFF and data sizes are 0xFFFFFFFF, the usual
    # streaming convention; libsndfile (like most readers) then takes the data to run to the end of the file.
    unknown = 0xFFFFFFFF
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
    riff = struct.pack("<4sI4s", b"RIFF", unknown, b"WAVE")
    return riff + fmt_chunk + struct.pack("<4sI", b"data", unknown)


class _StreamSink:
    """The file libsndfile writes to: it keeps only bytes not yet handed out.

    soundfile's virtual IO needs seek and tell even for writing (libsndfile asks for the file length on open),
    and libFLAC seeks back on close to patch STREAMINFO (total samples, MD5, frame sizes). Those bytes have
    already been sent by then, so such writes are dropped: the stream keeps the values written up front,
    which the FLAC format defines as "unknown". Ogg Opus only ever appends.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._sent = 0  # absolute offset of _pending[0]
        self._pos = 0

    def write(self, data: bytes) -> int:
        start = self._pos - self._sent
        self._pos += len(data)
        skip = max(0, -start)  # the part that lands in bytes already sent
        if skip < len(data):
            start += skip
            if start > len(self._pending):
                self._pending.extend(bytes(start - len(self._pending)))
            self._pending[start : start + len(data) - skip] = data[skip:]
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # Must not raise: an exception inside a cffi callback is only printed.
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._sent + len(self._pending)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._sent += len(data)
        self._pending.clear()
        return data


class StreamEncoder:
    """Encodes float32 mono samples chunk by chunk; header() + every encode() + finish() is a whole file."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._finished = False
        self._sink: _StreamSink | None = None
        self._file: sf.SoundFile | None = None
        if fmt in ("flac", "ogg_opus"):
            self._sink = _StreamSink()
            container, subtype = ("FLAC", "PCM_16") if fmt == "flac" else ("OGG", "OPUS")
            try:
                self._file = sf.SoundFile(
                    self._sink, "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
                )
            except sf.SoundFileError as e:
                raise ValueError(f"cannot encode {fmt} at {sample_rate} Hz: {e}") from e

    def header(self) -> bytes:
        """Bytes that can go out before any audio (the WAV header; empty for the others)."""
        return _wav_header(self.sample_rate) if self.fmt == "wav" else b""

    def encode(self, samples: np.ndarray) -> bytes:
        """The bytes available after these samples; may be empty while a codec fills a block or page."""
        if self._finished:
            raise RuntimeError("encode() after finish()")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.fmt == "pcm_f32":
            return samples.astype("<f4").tobytes()
        if self.fmt in ("pcm16", "wav"):
            return _pcm16(samples)
        assert self._file is not None and self._sink is not None
        self._file.write(samples)
        return self._sink.take()

    def finish(self) -> bytes:
        """The remaining bytes (the last FLAC block, the last Ogg page); empty for the raw formats and WAV."""
        if self._finished:
            return b""
        self._finished = True
        if self._file is None or self._sink is None:
            return b""
        self._file.close()
        return self._sink.take()

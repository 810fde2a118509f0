"""Files the client writes open with soundfile, Python's wave, sox and ffmpeg, and say how long they are.

The bytes are made as the gateway makes them (header(), encode() per 3200-sample frame, finish()), so the
containers are the streaming ones: sizes unknown until the client finalizes them on write.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from vibevoice.tts.v1 import tts_pb2

from services.client import FORMAT_BY_SUFFIX, Result, write
from services.common.audio import SAMPLE_RATE, SAMPLES_PER_FRAME, StreamEncoder
from services.common.audio_files import ContainerError, finalize

# 25 frames = 80,000 samples: more than one 65,536-frame read when the FLAC's length is counted.
FRAMES = 25
SAMPLES = FRAMES * SAMPLES_PER_FRAME
FORMATS = {".wav": "wav", ".flac": "flac", ".ogg": "ogg_opus", ".pcm": "pcm16", ".f32": "pcm_f32"}
RAW = {".pcm": ("s16le", "s16", 2), ".f32": ("f32le", "f32", 4)}  # ffmpeg format, sox type, bytes


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `apt-get install -y sox ffmpeg` (.ci/run installs them)")
    return path


def signal() -> np.ndarray:
    t = np.arange(SAMPLES) / SAMPLE_RATE
    noise = np.random.default_rng(3).standard_normal(SAMPLES) * 0.05
    return (0.4 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


def streamed(fmt: str, samples: np.ndarray) -> Result:
    """The chunks the gateway would send: the header rides with frame 0, the codec's tail after the last."""
    encoder = StreamEncoder(fmt)
    pending = encoder.header()
    result = Result(header=tts_pb2.StreamHeader(sample_rate=SAMPLE_RATE, format=FORMAT_BY_SUFFIX[f".{ext(fmt)}"]))
    for i in range(FRAMES):
        data = pending + encoder.encode(samples[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME])
        pending = b""
        result.chunks.append(tts_pb2.AudioChunk(frame_index=i, data=data))
    tail = encoder.finish()
    if tail:
        result.chunks.append(tts_pb2.AudioChunk(frame_index=FRAMES - 1, data=tail))
    return result


def quantized(samples: np.ndarray, suffix: str) -> np.ndarray:
    # The WAV path scales by 32767; libsndfile's FLAC encoder by 32768, clipped.
    scale = 32767.0 if suffix == ".wav" else 32768.0
    return np.clip(np.round(samples * scale), -32768, 32767).astype(np.int16)


def ext(fmt: str) -> str:
    return {v: k for k, v in FORMATS.items()}[fmt].lstrip(".")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("audio-files")
    samples = signal()
    paths = {}
    for suffix, fmt in FORMATS.items():
        paths[suffix] = out / f"speech{suffix}"
        write(streamed(fmt, samples), paths[suffix])
    return paths


def ffprobe(path: Path) -> dict:
    out = subprocess.run(
        [tool("ffprobe"), "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    [stream] = json.loads(out.stdout)["streams"]
    return stream


def ffmpeg_decoded_samples(path: Path, raw: list[str] = ()) -> int:
    """Samples ffmpeg decodes (at the file's own rate), as 16-bit mono."""
    out = subprocess.run(
        [tool("ffmpeg"), "-v", "error", *raw, "-i", str(path), "-ac", "1", "-f", "s16le", "-"],
        capture_output=True,
        check=True,
    )
    return len(out.stdout) // 2


def sox_samples(path: Path) -> int:
    """What the header says (`sox --i`)."""
    out = subprocess.run([tool("sox"), "--i", "-s", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def sox_decoded_samples(path: Path, raw: list[str] = ()) -> int:
    """What sox decodes (its `stat` effect counts the samples read)."""
    out = subprocess.run([tool("sox"), *raw, str(path), "-n", "stat"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(next(line for line in out.stderr.splitlines() if line.startswith("Samples read:")).split()[-1])


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg"])
def test_soundfile_reads_the_length_and_the_audio(files, suffix):
    path = files[suffix]
    assert sf.info(path).frames == SAMPLES
    audio, rate = sf.read(path, dtype="int16")
    assert rate == SAMPLE_RATE and audio.shape == (SAMPLES,)
    if suffix != ".ogg":  # lossless: exactly the 16-bit samples the encoder quantized
        np.testing.assert_array_equal(audio, quantized(signal(), suffix))


def test_wave_reads_the_wav_length(files):
    with wave.open(str(files[".wav"])) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        assert w.getnframes() == SAMPLES
        assert len(w.readframes(SAMPLES + 1)) == SAMPLES * 2


def test_wav_sizes_match_the_file(files):
    data = files[".wav"].read_bytes()
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    assert data[36:40] == b"data" and struct.unpack_from("<I", data, 40)[0] == SAMPLES * 2


def test_flac_streaminfo_has_the_total_and_the_md5(files):
    data = files[".flac"].read_bytes()
    info = int.from_bytes(data[18:26], "big")
    assert info & (2**36 - 1) == SAMPLES
    pcm, _ = sf.read(files[".flac"], dtype="int16")
    assert data[26:42] == hashlib.md5(pcm.astype("<i2").tobytes()).digest()


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_sox_and_ffmpeg_read_the_length(files, suffix):
    path = files[suffix]
    assert sox_samples(path) == SAMPLES
    assert sox_decoded_samples(path) == SAMPLES
    stream = ffprobe(path)
    assert int(stream["sample_rate"]) == SAMPLE_RATE and int(stream["duration_ts"]) == SAMPLES
    assert float(stream["duration"]) == pytest.approx(SAMPLES / SAMPLE_RATE, abs=1e-6)
    assert ffmpeg_decoded_samples(path) == SAMPLES


def test_ffmpeg_reads_the_opus_length(files):
    path = files[".ogg"]
    data = path.read_bytes()
    pre_skip = struct.unpack_from("<H", data, data.index(b"OpusHead") + 10)[0]
    stream = ffprobe(path)
    assert stream["codec_name"] == "opus"
    # Opus runs at 48 kHz; the last granule position counts the decoder's pre-skip too (ffprobe reports it).
    assert int(stream["duration_ts"]) == pre_skip + 2 * SAMPLES
    assert ffmpeg_decoded_samples(path) == 2 * SAMPLES


def test_sox_opens_the_opus_file(files):
    formats = subprocess.run([tool("sox"), "--help"], capture_output=True, text=True).stdout
    out = subprocess.run([tool("sox"), "--i", "-s", str(files[".ogg"])], capture_output=True, text=True)
    if " opus" in formats.split("AUDIO FILE FORMATS:")[1].split("\n")[0]:
        assert out.returncode == 0 and int(out.stdout) == SAMPLES, out.stderr
    else:
        # Debian's sox is built without Opus: it can only tell the file is Ogg Opus.
        assert "no handler for detected file type `opus'" in out.stderr


@pytest.mark.parametrize("suffix", [".pcm", ".f32"])
def test_raw_files_are_the_samples_and_nothing_else(files, suffix):
    path = files[suffix]
    ffmpeg_fmt, sox_type, width = RAW[suffix]
    assert path.stat().st_size == SAMPLES * width
    raw = ["-f", ffmpeg_fmt, "-ar", str(SAMPLE_RATE), "-ac", "1"]
    assert ffmpeg_decoded_samples(path, raw) == SAMPLES
    assert sox_decoded_samples(path, ["-t", sox_type, "-r", str(SAMPLE_RATE), "-c", "1"]) == SAMPLES


def test_finalize_is_idempotent_and_refuses_other_bytes(files):
    for suffix in (".wav", ".flac"):
        data = files[suffix].read_bytes()
        assert finalize(data, FORMATS[suffix]) == data
    with pytest.raises(ContainerError):
        finalize(b"ID3\x04" + bytes(60), "wav")
    with pytest.raises(ContainerError):
        finalize(b"OggS" + bytes(60), "flac")

"""Voice decoding and normalization as the reference does them, and the streaming encoders' round trips."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers.models.vibevoice_acoustic_tokenizer import VibeVoiceAcousticTokenizerFeatureExtractor

from services.acoustic.voice_prompts import normalize_voice
from services.common.audio import (
    FORMATS,
    MAX_VOICE_BYTES,
    MEDIA_TYPES,
    SAMPLE_RATE,
    AudioError,
    StreamEncoder,
    decode_voice,
)

VOICES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "vibevoice-demo" / "voices"
SINE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
CHUNK = 3200
PCM16_STEP = 1 / 32767


def encode(fmt: str, samples: np.ndarray = SINE) -> list[bytes]:
    """header(), one encode() per 3200-sample chunk, finish(): what a server would send, in order."""
    enc = StreamEncoder(fmt)
    chunks = [enc.encode(samples[i : i + CHUNK]) for i in range(0, len(samples), CHUNK)]
    return [enc.header(), *chunks, enc.finish()]


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_every_format_has_a_media_type_and_unknown_ones_are_refused():
    assert set(MEDIA_TYPES) == set(FORMATS)
    with pytest.raises(ValueError, match="mp3"):
        StreamEncoder("mp3")


def test_pcm_f32_round_trip_is_exact():
    assert np.array_equal(np.frombuffer(b"".join(encode("pcm_f32")), "<f4"), SINE)


def test_pcm16_round_trip_and_clipping():
    decoded = np.frombuffer(b"".join(encode("pcm16")), "<i2")
    assert np.abs(decoded / 32767 - SINE).max() <= PCM16_STEP
    loud = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0], dtype=np.float32)
    clipped = np.frombuffer(b"".join(encode("pcm16", loud)), "<i2")
    assert clipped.tolist() == [-32767, -32767, 0, 16384, 32767, 32767]


def test_streaming_wav_reads_back_and_sends_every_chunk():
    parts = encode("wav")
    assert struct.unpack_from("<I", parts[0], 4)[0] == 0xFFFFFFFF  # RIFF size unknown up front
    assert len(parts[0]) == 44 and all(len(p) == 2 * CHUNK for p in parts[1:-2])
    audio, rate = sf.read(io.BytesIO(b"".join(parts)), dtype="float32")
    assert rate == SAMPLE_RATE and audio.shape == SINE.shape
    assert np.abs(audio - SINE).max() <= PCM16_STEP


def test_flac_round_trip_and_bytes_before_finish():
    parts = encode("flac")
    data = b"".join(parts)
    assert data[:4] == b"fLaC"
    # libFLAC emits a frame per 4096-sample block, so most of the file leaves before finish().
    assert sum(len(p) for p in parts[:-1]) > len(data) // 2
    # The streamed header cannot know the length; decode_voice reads such FLAC (plain sf.read cannot).
    audio = decode_voice(data)
    assert audio.shape == SINE.shape and np.abs(audio - SINE).max() <= PCM16_STEP


def test_ogg_opus_round_trip():
    data = b"".join(encode("ogg_opus"))
    assert data[:4] == b"OggS" and data[28:36] == b"OpusHead"
    # Duration from the container: the last page's granule position (48 kHz) less the pre-skip.
    pre_skip = struct.unpack_from("<H", data, 28 + 10)[0]
    last_granule = struct.unpack_from("<q", data, data.rindex(b"OggS") + 6)[0]
    assert abs((last_granule - pre_skip) / 48000 - 1.0) <= 0.020
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")  # libsndfile drops the pre-skip
    assert rate == SAMPLE_RATE and abs(len(audio) - len(SINE)) <= SAMPLE_RATE // 50
    n = min(len(audio), len(SINE))
    assert np.corrcoef(audio[:n], SINE[:n])[0, 1] > 0.9


def mp3_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="MP3")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("encode_file", "bound"),
    # WAV: resampling alone. MP3: lossy, about 0.007 RMS at libsndfile's default quality; the encoder's delay and
    # padding are taken off (the LAME header says how much), so the length is exact.
    [(wav_bytes, lambda e: np.abs(e).max() < 1e-3), (mp3_bytes, lambda e: np.sqrt(np.mean(e**2)) < 0.02)],
    ids=["wav", "mp3"],
)
def test_stereo_16k_voice_becomes_24k_mono(encode_file, bound):
    t = np.arange(2 * 16000) / 16000
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)
    voice = decode_voice(encode_file(np.stack([left, right], axis=1), 16000))
    assert voice.dtype == np.float32 and voice.ndim == 1 and len(voice) == 2 * SAMPLE_RATE
    # The mean of the channels, resampled: 0.3 sin(300 Hz) at 24 kHz.
    expected = 0.3 * np.sin(2 * np.pi * 300 * np.arange(len(voice)) / SAMPLE_RATE)
    assert bound((voice - expected)[200:-200])


def test_an_mp3_voice_over_the_limit_is_refused_by_what_it_holds():
    # An MP3's length in its header may be an estimate, so the samples read are what the limit is held to.
    with pytest.raises(AudioError, match="longer than the limit of 60 s"):
        decode_voice(mp3_bytes(np.zeros(61 * 8000, np.float32), 8000))


def test_a_cut_mp3_gives_the_audio_before_the_cut_or_a_reason():
    data = mp3_bytes(0.3 * np.sin(2 * np.pi * 300 * np.arange(2 * 16000) / 16000), 16000)
    whole = len(decode_voice(data))
    assert 0 < len(decode_voice(data[: len(data) // 2])) < whole
    with pytest.raises(AudioError, match="not a WAV, FLAC, Ogg or MP3 audio file"):
        decode_voice(data[:100])


def test_voice_at_24k_is_read_exactly():
    path = VOICES / "en-Carter_man.wav"
    expected, rate = sf.read(path, dtype="float32")
    assert rate == SAMPLE_RATE
    voice = decode_voice(path.read_bytes())
    assert voice.dtype == np.float32 and np.array_equal(voice, expected)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(4096), "not a WAV, FLAC, Ogg or MP3 audio file"),
        (b"\0" * (MAX_VOICE_BYTES + 1), "size limit"),
        (wav_bytes(np.zeros(61 * 8000), 8000), "60"),
        (wav_bytes(np.zeros((0, 2)), 16000), "no audio samples"),
    ],
    ids=["empty", "random-bytes", "too-big", "too-long", "no-samples"],
)
def test_unusable_voices_are_refused_with_the_reason(data, words):
    with pytest.raises(AudioError, match=words):
        decode_voice(data)


def test_too_long_voice_says_how_long():
    with pytest.raises(AudioError, match=r"61\.0 s long; the limit is 60 s"):
        decode_voice(wav_bytes(np.zeros(61 * 8000), 8000))


def test_silence_is_accepted():
    assert not decode_voice(wav_bytes(np.zeros(2400), SAMPLE_RATE)).any()


def reference_normalize(x: np.ndarray) -> torch.Tensor:
    out = VibeVoiceAcousticTokenizerFeatureExtractor()(x, sampling_rate=SAMPLE_RATE)["input_values"]
    return out[0, 0, : len(x)]


def test_normalization_equals_the_feature_extractor_on_a_voice():
    voice = decode_voice((VOICES / "en-Carter_man.wav").read_bytes())
    ours = normalize_voice(torch.from_numpy(voice))
    # The voice's peak stays under 1 after scaling to -25 dBFS, so this is the plain-gain branch.
    assert ours.abs().max() <= 1.0
    assert torch.equal(ours, reference_normalize(voice))


def test_normalization_equals_the_feature_extractor_when_the_peak_exceeds_one():
    loud = SINE * 0.01
    loud[1000] = 0.9  # one spike: -25 dBFS RMS pushes it far above 1, so the peak division runs
    ours = normalize_voice(torch.from_numpy(loud))
    assert ours.abs().max() < 1.0 and ours.abs().max() > 0.999
    assert torch.equal(ours, reference_normalize(loud))

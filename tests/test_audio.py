"""Voice decoding as the reference prepares audio, and the streaming encoders' round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers.models.vibevoice_acoustic_tokenizer import VibeVoiceAcousticTokenizerFeatureExtractor

from services.common.audio import SAMPLE_RATE, StreamEncoder, decode_voice, normalize_voice
from tests.conftest import VOICES

SINE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)


def encode(fmt: str) -> tuple[bytes, list[bytes]]:
    enc = StreamEncoder(fmt)
    parts = [enc.header()] + [enc.encode(SINE[i : i + 3200]) for i in range(0, len(SINE), 3200)] + [enc.finish()]
    return b"".join(parts), parts


def test_raw_formats_round_trip():
    f32, _ = encode("pcm_f32")
    assert np.array_equal(np.frombuffer(f32, "<f4"), SINE)
    s16, _ = encode("pcm16")
    assert np.abs(np.frombuffer(s16, "<i2") / 32767.0 - SINE).max() <= 0.5 / 32767 + 1e-7


def test_streaming_wav_reads_back_and_streams_every_chunk():
    data, parts = encode("wav")
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SAMPLE_RATE and audio.shape == SINE.shape
    assert np.abs(audio - SINE).max() < 2 / 32767
    assert [len(p) for p in parts[1:-1]] == [6400] * 7 + [3200]  # bytes leave with every frame


def test_ogg_opus_is_a_valid_file():
    data, _ = encode("ogg_opus")
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SAMPLE_RATE and abs(len(audio) - len(SINE)) < SAMPLE_RATE // 50
    assert np.corrcoef(audio[2000:20000], SINE[2000:20000])[0, 1] > 0.9


def test_flac_streams_bytes_before_the_end():
    data, parts = encode("flac")
    assert data[:4] == b"fLaC"
    assert sum(len(p) for p in parts[1:-1]) > len(data) // 2


def test_voice_at_24k_is_read_exactly():
    path = VOICES / "en-Carter_man.wav"
    assert np.array_equal(decode_voice(path.read_bytes()), sf.read(path, dtype="float32")[0])


def test_stereo_16k_voice_becomes_24k_mono():
    buf = io.BytesIO()
    t = np.arange(16000 * 2) / 16000
    sf.write(
        buf, np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], axis=1) * 0.4, 16000, format="WAV"
    )
    voice = decode_voice(buf.getvalue())
    assert voice.dtype == np.float32 and voice.ndim == 1 and abs(len(voice) - 2 * SAMPLE_RATE) <= 2


@pytest.mark.parametrize("gain", [1.0, 40.0])
def test_normalization_equals_the_reference_feature_extractor(gain):
    voice = sf.read(VOICES / "en-Maya_woman.wav", dtype="float32")[0][: SAMPLE_RATE * 3] * gain
    voice[100] = 0.99  # a peak that exceeds 1 after scaling for the quiet case too
    expected = VibeVoiceAcousticTokenizerFeatureExtractor()(voice, sampling_rate=SAMPLE_RATE)["input_values"]
    assert torch.equal(torch.from_numpy(normalize_voice(voice)), expected[0, 0, : len(voice)])

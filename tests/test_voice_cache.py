"""Decoded voices are kept by their files' bytes: a file sent again is not decoded again, the samples are those
of a fresh decode, a file that fails is never kept, and the cache stays within its bytes."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.audio import AudioError, decode_voice, voice_digest
from services.synthesis.voice_cache import DecodedVoices
from tests.conftest import VOICES


class CountingDecoder:
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, data: bytes) -> np.ndarray:
        self.calls.append(data)
        if data.startswith(b"bad"):
            raise AudioError("not audio")
        return np.full(len(data), float(data[0]), dtype=np.float32)


def test_a_file_sent_again_is_decoded_once_and_another_file_is_decoded():
    cache, decode = DecodedVoices(), CountingDecoder()
    first = cache.get(b"a" * 100, decode)
    again = cache.get(b"a" * 100, decode)
    other = cache.get(b"a" * 99 + b"b", decode)  # one byte differs: another voice
    assert decode.calls == [b"a" * 100, b"a" * 99 + b"b"]
    assert again is first and other is not first
    assert len(cache) == 2 and cache.held_bytes == first.nbytes + other.nbytes


def test_a_file_that_fails_is_not_kept_and_fails_each_time():
    cache, decode = DecodedVoices(), CountingDecoder()
    for _ in range(2):
        with pytest.raises(AudioError, match="not audio"):
            cache.get(b"bad file", decode)
    assert len(decode.calls) == 2 and len(cache) == 0 and cache.held_bytes == 0


def test_the_least_recently_used_voices_go_first_and_the_cache_stays_within_its_bytes():
    decode = CountingDecoder()
    cache = DecodedVoices(capacity_bytes=3 * 4 * 10)  # three voices of 10 float32 samples
    for name in (b"0", b"1", b"2"):
        cache.get(name * 10, decode)
    cache.get(b"0" * 10, decode)  # used again: now the most recent
    cache.get(b"3" * 10, decode)  # a fourth: the least recently used ("1") goes
    assert cache.held_bytes == 3 * 40 and len(cache) == 3
    decode.calls.clear()
    cache.get(b"0" * 10, decode)
    cache.get(b"1" * 10, decode)
    assert decode.calls == [b"1" * 10]  # "0" was kept, "1" was not
    cache.get(b"x" * 1000, decode)  # alone larger than the cache: decoded, not kept
    assert cache.held_bytes <= 3 * 40 and b"x" * 1000 in decode.calls


def test_a_kept_voice_is_the_voice_a_fresh_decode_gives():
    data = (VOICES / "en-Alice_woman.wav").read_bytes()
    cache = DecodedVoices()
    model_voice = decode_voice
    kept = cache.get(data, model_voice)
    fresh = model_voice(data)
    assert np.array_equal(cache.get(data, model_voice).samples, fresh)
    assert kept.samples.dtype == np.float32 and len(kept.samples) > 24_000
    # the digest kept beside it is the one EncodeVoice would compute from a fresh decode's samples
    assert kept.digest == voice_digest(fresh)

"""Audio checks on synthetic signals whose answers are known: gaps, clipping, BS.1770 loudness, any chunking."""

from __future__ import annotations

import numpy as np
import pyloudnorm
import pytest

from services.common.audio_checks import SILENCE_WINDOW, AudioChecker, check_audio
from services.common.frames import SAMPLE_RATE

WINDOW_S = SILENCE_WINDOW / SAMPLE_RATE


def tone(seconds: float, amplitude: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return amplitude * np.sin(2 * np.pi * hz * t)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE))


def test_a_hole_of_1_5_s_in_a_sine_is_measured_and_flagged():
    checks = check_audio(np.concatenate([tone(1.0), silence(1.5), tone(1.0)]))
    # Windows that hold some of the sine are not silent: at most one window short of the hole.
    assert 1.5 - WINDOW_S <= checks.longest_silence_s <= 1.5
    assert checks.longest_gap_s == checks.longest_silence_s
    assert checks.gap_at_s == pytest.approx(1.0, abs=WINDOW_S)
    assert checks.gap_over_1s
    assert checks.seconds == pytest.approx(3.5)
    assert "GAP of 1.49 s inside a segment at 1.00 s" in checks.summary()


def test_leading_and_trailing_silence_are_not_gaps():
    checks = check_audio(np.concatenate([silence(2.0), tone(1.0), silence(0.3), tone(1.0), silence(3.0)]))
    assert 0.3 - WINDOW_S <= checks.longest_silence_s <= 0.3
    assert not checks.gap_over_1s
    only_edges = check_audio(np.concatenate([silence(2.0), tone(1.0), silence(2.0)]))
    assert only_edges.longest_silence_s == 0.0 and only_edges.gap_at_s is None


def test_quiet_sound_above_the_threshold_is_not_silence():
    # -40 dBFS is quiet speech, not a gap; -60 dBFS is below the -50 dBFS threshold.
    quiet = check_audio(np.concatenate([tone(1.0), tone(1.5, amplitude=0.01), tone(1.0)]))
    assert quiet.longest_silence_s == 0.0
    hiss = check_audio(np.concatenate([tone(1.0), tone(1.5, amplitude=0.001), tone(1.0)]))
    assert hiss.longest_silence_s > 1.4


def test_a_gap_at_a_segment_seam_is_not_inside_a_segment():
    first = np.concatenate([tone(1.0), silence(0.75)])
    second = np.concatenate([silence(0.75), tone(1.0), silence(1.2), tone(0.5)])
    audio = np.concatenate([first, second])
    unsegmented = check_audio(audio)
    assert unsegmented.longest_gap_s > 1.4 and unsegmented.gap_at_s == pytest.approx(1.0, abs=WINDOW_S)
    checks = check_audio(audio, segment_starts=[len(first)])
    assert checks.longest_silence_s == unsegmented.longest_silence_s  # the whole audio still hears the seam
    # Inside a segment the longest gap is the 1.2 s one in the second segment, which is over the limit.
    assert 1.2 - WINDOW_S <= checks.longest_gap_s <= 1.2
    assert checks.gap_at_s == pytest.approx(1.75 + 1.75, abs=WINDOW_S)
    assert checks.gap_over_1s
    shorter = np.concatenate([first, silence(0.75), tone(1.0), silence(0.5), tone(0.5)])
    assert not check_audio(shorter, segment_starts=[len(first)]).gap_over_1s


def test_clipped_samples_are_counted_on_the_float_signal():
    audio = tone(1.0, amplitude=0.5)
    audio[[10, 20, 30, 40, 50, 60, 70]] = 1.0
    audio[[11, 21, 31]] = -1.0
    audio[[12, 22]] = 1.0 - 1e-7  # full scale after float rounding
    audio[[13, 23]] = 0.9999  # loud, not clipped
    audio[14] = 1.5  # beyond full scale
    assert check_audio(audio).clipped_samples == 7 + 3 + 2 + 1
    assert check_audio(tone(1.0, amplitude=0.99)).clipped_samples == 0
    assert check_audio(np.clip(tone(1.0, amplitude=2.0), -1.0, 1.0)).clipped_samples > 0.3 * SAMPLE_RATE


def test_a_reference_tone_measures_minus_23_lufs():
    # A 997 Hz sine at -20 dBFS peak (-23 dBFS RMS) reads -23 LUFS through the K-weighting.
    reference = tone(10.0, amplitude=0.1, hz=997.0)
    assert check_audio(reference).loudness_lufs == pytest.approx(-23.0, abs=0.5)
    # Silence is gated out (absolute gate), a passage 20 LU quieter too (relative gate).
    with_silence = np.concatenate([reference, silence(10.0), reference])
    assert check_audio(with_silence).loudness_lufs == pytest.approx(-23.0, abs=0.5)
    with_quiet = np.concatenate([reference, tone(5.0, amplitude=0.01, hz=997.0), reference])
    assert check_audio(with_quiet).loudness_lufs == pytest.approx(-23.0, abs=0.5)
    assert check_audio(silence(5.0)).loudness_lufs is None
    assert check_audio(tone(0.3)).loudness_lufs is None  # shorter than one 400 ms block


def test_loudness_equals_pyloudnorm_on_the_whole_array():
    rng = np.random.default_rng(7)
    seconds = 12
    envelope = 0.1 * (1.0 + np.sin(2 * np.pi * 0.5 * np.arange(seconds * SAMPLE_RATE) / SAMPLE_RATE))
    speechlike = rng.standard_normal(seconds * SAMPLE_RATE) * envelope
    expected = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(speechlike)
    assert check_audio(speechlike).loudness_lufs == pytest.approx(expected, abs=1e-9)


def test_chunks_of_any_size_give_the_whole_array_result():
    rng = np.random.default_rng(3)
    audio = np.concatenate(
        [
            silence(0.4),
            tone(1.3, amplitude=1.4).clip(-1.0, 1.0),
            silence(1.1),
            rng.standard_normal(SAMPLE_RATE) * 0.2,
            silence(0.6),
            tone(2.0, amplitude=0.05, hz=997.0),
            silence(1.25),
            tone(0.7),
            silence(0.5),
        ]
    ).astype(np.float32)
    starts = [3200 * 11, 3200 * 31 + 17]  # one on a window boundary, one inside a window
    whole = check_audio(audio, segment_starts=starts)
    assert whole.clipped_samples > 0 and whole.gap_over_1s and whole.loudness_lufs is not None

    random_cuts = rng.integers(0, len(audio), 60).tolist()
    assert feed(audio, starts, random_cuts, read_midway=True) == whole
    # Odd-sized and frame-sized chunks agree too.
    for size in (7, 3200):
        assert feed(audio, starts, range(0, len(audio), size)) == whole


def feed(audio: np.ndarray, starts: list[int], cuts, read_midway: bool = False):
    checker = AudioChecker()
    done = 0
    for cut in sorted({*cuts, *starts, len(audio)}):
        checker.add(audio[done:cut])
        if cut in starts:
            checker.start_segment()
        if read_midway:
            checker.result()  # reading it changes nothing
        done = cut
    return checker.result()


def test_audio_must_be_one_channel():
    with pytest.raises(ValueError, match="one channel"):
        AudioChecker().add(np.zeros((100, 2)))

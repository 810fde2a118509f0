"""Checks on a job's finished audio: the longest silence inside speech, clipped samples, integrated loudness.

They put a number on the long-form complaint "gaps in long audio". AudioChecker takes the audio in chunks of
any size (as a job streams its frames, or as its stored file is read back) and gives the same result as
check_audio on the whole array, without holding the audio: loudness keeps one energy per 100 ms.

Silence is a window of SILENCE_WINDOW samples whose RMS is below SILENCE_DBFS. Leading and trailing silence
are left out: a gap is silence with sound on both sides. A job made of segments (generations of their own, see
services/text_parser/segments.py) also gets its longest gap inside a segment, leaving out each segment's own
leading and trailing silence, and `gap_over_1s` flags a gap there longer than MAX_GAP_SECONDS.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyloudnorm
import scipy.signal

from services.common.frames import SAMPLE_RATE, SAMPLES_PER_FRAME

SILENCE_DBFS = -50.0  # a window's RMS below this, relative to full scale, is silence
SILENCE_WINDOW = SAMPLES_PER_FRAME // 10  # 13.3 ms; a speech frame is ten windows, so frame boundaries align
MAX_GAP_SECONDS = 1.0
# A sample at full scale, give or take float rounding of a clamp at 1.0.
CLIP_LEVEL = 1.0 - 1e-6
ABSOLUTE_GATE_LUFS = -70.0  # ITU-R BS.1770-4 gating
RELATIVE_GATE_LU = -10.0


@dataclass(frozen=True)
class AudioChecks:
    seconds: float
    longest_silence_s: float  # inside speech, over the whole audio (seams between segments included)
    longest_gap_s: float  # inside speech within one segment
    gap_at_s: float | None  # where that gap starts
    gap_over_1s: bool
    clipped_samples: int
    loudness_lufs: float | None  # None: no 400 ms block above the absolute gate (silent, or shorter than 0.4 s)

    def summary(self) -> str:
        loudness = "no loudness (silent or short)" if self.loudness_lufs is None else f"{self.loudness_lufs:.1f} LUFS"
        line = (
            f"{self.seconds:.1f} s of audio, longest silence {self.longest_silence_s:.2f} s, "
            f"{self.clipped_samples} clipped samples, {loudness}"
        )
        if self.gap_over_1s:
            line += f"; GAP of {self.longest_gap_s:.2f} s inside a segment at {self.gap_at_s:.2f} s"
        return line


@dataclass
class _Gaps:
    """Runs of silent windows with sound on both sides; `restart` forgets the sound before it (a new segment)."""

    heard: bool = False
    run: int = 0
    run_start: int = 0
    longest: int = 0
    longest_start: int | None = None

    def window(self, index: int, silent: bool) -> None:
        if not silent:
            if self.run > self.longest:
                self.longest, self.longest_start = self.run, self.run_start
            self.heard, self.run = True, 0
        elif self.heard:
            if self.run == 0:
                self.run_start = index
            self.run += 1

    def restart(self) -> None:
        self.heard, self.run = False, 0


class _Loudness:
    """Integrated loudness per ITU-R BS.1770 with pyloudnorm's K-weighting filters, run over a stream.

    The filters keep their state across chunks, and each 100 ms hop's energy is summed once it is complete, so
    any chunking gives the same numbers; the gating over 400 ms blocks (75% overlap) is pyloudnorm's.
    """

    def __init__(self, rate: int) -> None:
        meter = pyloudnorm.Meter(rate)
        # The meter's own K-weighting stages (a dict in filter order), so the weighting is pyloudnorm's.
        self.stages = [(f.b, f.a, f.passband_gain) for f in meter._filters.values()]
        self.state = [np.zeros(max(len(a), len(b)) - 1) for b, a, _ in self.stages]
        self.hop = round(rate * meter.block_size * (1 - meter.overlap))
        self.hops_per_block = round(1 / (1 - meter.overlap))
        self.pending = np.empty(0)
        self.hop_energy: list[float] = []

    def add(self, x: np.ndarray) -> None:
        for i, (b, a, gain) in enumerate(self.stages):
            x, self.state[i] = scipy.signal.lfilter(b, a, x, zi=self.state[i])
            x = gain * x
        pending = np.concatenate([self.pending, x])
        whole = len(pending) // self.hop * self.hop
        hops = pending[:whole].reshape(-1, self.hop)
        self.hop_energy.extend(np.sum(np.square(hops), axis=1).tolist())
        self.pending = pending[whole:].copy()

    def lufs(self) -> float | None:
        energy = np.asarray(self.hop_energy)
        n = len(energy) - self.hops_per_block + 1
        if n < 1:
            return None
        block = sum(energy[k : k + n] for k in range(self.hops_per_block)) / (self.hop * self.hops_per_block)
        with np.errstate(divide="ignore"):
            loudness = -0.691 + 10.0 * np.log10(block)
        gated = block[loudness >= ABSOLUTE_GATE_LUFS]
        if not len(gated):
            return None
        relative = -0.691 + 10.0 * math.log10(gated.mean()) + RELATIVE_GATE_LU
        kept = block[(loudness > relative) & (loudness > ABSOLUTE_GATE_LUFS)]
        return -0.691 + 10.0 * math.log10(kept.mean())


class AudioChecker:
    """The checks over 24 kHz float audio given in chunks; `result()` may be read at any point and changes nothing."""

    def __init__(self, silence_dbfs: float = SILENCE_DBFS) -> None:
        self.silent_energy = 10 ** (silence_dbfs / 10)  # mean square of a window at the threshold
        self.samples = 0
        self.clipped = 0
        self.windows = 0  # complete windows judged so far
        self.pending = np.empty(0)  # samples of the window being filled
        self.starts: list[int] = []  # segment starts (samples) not yet reached by a window
        self.whole = _Gaps()
        self.segment = _Gaps()
        self.loudness = _Loudness(SAMPLE_RATE)

    def start_segment(self) -> None:
        """The next sample begins a new segment; the window holding a boundary belongs to the segment it starts in."""
        self.starts.append(self.samples)

    def add(self, audio: np.ndarray) -> None:
        x = np.asarray(audio, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"audio must be one channel of samples, got shape {x.shape}")
        self.samples += len(x)
        self.clipped += int(np.count_nonzero(np.abs(x) >= CLIP_LEVEL))
        self.loudness.add(x)
        pending = np.concatenate([self.pending, x])
        whole = len(pending) // SILENCE_WINDOW * SILENCE_WINDOW
        self._judge(self.whole, self.segment, pending[:whole].reshape(-1, SILENCE_WINDOW))
        self.pending = pending[whole:].copy()

    def _judge(self, whole: _Gaps, segment: _Gaps, windows: np.ndarray) -> None:
        silent = np.mean(np.square(windows), axis=1) < self.silent_energy
        for quiet in silent.tolist():
            while self.starts and self.windows * SILENCE_WINDOW >= self.starts[0]:
                self.starts.pop(0)
                segment.restart()
            whole.window(self.windows, quiet)
            segment.window(self.windows, quiet)
            self.windows += 1

    def result(self) -> AudioChecks:
        # The last, partial window is judged on copies, so more audio may still follow.
        saved = self.windows, list(self.starts)
        whole, segment = copy.copy(self.whole), copy.copy(self.segment)
        if len(self.pending):
            self._judge(whole, segment, self.pending[None, :])
        self.windows, self.starts = saved
        window_s = SILENCE_WINDOW / SAMPLE_RATE
        gap_s = segment.longest * window_s
        return AudioChecks(
            seconds=self.samples / SAMPLE_RATE,
            longest_silence_s=whole.longest * window_s,
            longest_gap_s=gap_s,
            gap_at_s=None if segment.longest_start is None else segment.longest_start * window_s,
            gap_over_1s=gap_s > MAX_GAP_SECONDS,
            clipped_samples=self.clipped,
            loudness_lufs=self.loudness.lufs(),
        )


def check_audio(audio: np.ndarray, segment_starts: Sequence[int] = ()) -> AudioChecks:
    """The checks on a whole array of 24 kHz float samples; `segment_starts`: the first sample of each segment."""
    checker = AudioChecker()
    done = 0
    for start in sorted(set(segment_starts)):
        if 0 < start < len(audio):
            checker.add(audio[done:start])
            checker.start_segment()
            done = start
    checker.add(audio[done:])
    return checker.result()

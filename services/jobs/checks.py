"""A finished job's audio checks (services/common/audio_checks.py), read back from its stored frames."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vibevoice.tts.v1 import jobs_pb2

from services.common.audio_checks import AudioChecker
from services.jobs.frame_log import read_samples


def check_job_audio(frames_path: Path, frames: int, segment_starts: Sequence[int] = ()) -> jobs_pb2.AudioChecks:
    """`segment_starts`: the first frame of each of the job's segments."""
    checker = AudioChecker()
    starts = set(segment_starts) - {0}
    for index, samples in enumerate(read_samples(frames_path, frames)):
        if index in starts:
            checker.start_segment()
        checker.add(samples)
    result = checker.result()
    checks = jobs_pb2.AudioChecks(
        longest_silence_seconds=result.longest_silence_s,
        clipped_samples=result.clipped_samples,
        gap_over_one_second=result.gap_over_1s,
        longest_gap_seconds=result.longest_gap_s,
        gap_at_seconds=result.gap_at_s or 0.0,
    )
    if result.loudness_lufs is not None:
        checks.integrated_loudness_lufs = result.loudness_lufs
    return checks

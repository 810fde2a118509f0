"""One job's frames on disk: fixed-size records, one per speech frame, appended as the frames are made.

A record is the frame's index (uint64) and segment (uint32), then its 3200 float32 samples, little-endian:
the model's samples unquantized, so any output format can be made from them later, and what a stream sends
for the frame (its index and segment) is known without the job's run. Fixed sizes make frame k's offset
k * RECORD_BYTES, and a file cut at a record boundary is always a valid log.

Beside the audio, each frame's state (what a resume rebuilds the stream from) goes to the job's state log
(services/jobs/state_log.py), record for record; `sync` makes both durable before a checkpoint counts them.

Appends go to the page cache at once (a reader in the same process sees them); `sync` makes them durable.
The store's record counts durable frames only, and opening a log cuts the file back to that count, so a
frame half-written when the process died is never read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from services.common.frames import SAMPLES_PER_FRAME
from services.jobs import appends
from services.jobs.state_log import FrameState, StateLog
from services.jobs.store import Store

_HEAD = struct.Struct("<QI")
SAMPLE_BYTES = SAMPLES_PER_FRAME * 4
RECORD_BYTES = _HEAD.size + SAMPLE_BYTES


class FrameLog:
    """The writer of one job's frames file, from its durable checkpoint on."""

    def __init__(self, store: Store, job_id: str, checkpoint: int) -> None:
        self.store = store
        self.path = store.frames_path(job_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size < checkpoint * RECORD_BYTES:
            os.close(self.fd)
            raise RuntimeError(f"{self.path}: {size} bytes, fewer than the {checkpoint} frames checkpointed")
        # Frames past the checkpoint may be torn or missing: they are made again.
        os.ftruncate(self.fd, checkpoint * RECORD_BYTES)
        store.release(size - checkpoint * RECORD_BYTES)
        self.frames = checkpoint
        self.synced = checkpoint
        try:
            self.states = StateLog(store, store.state_path(job_id), checkpoint)
        except BaseException:
            os.close(self.fd)  # no FrameLog to close it
            raise

    def append(self, index: int, segment: int, samples: np.ndarray, state: FrameState | None = None) -> None:
        if index != self.frames:
            raise ValueError(f"frame {index} out of order: the log holds {self.frames}")
        record = _HEAD.pack(index, segment) + np.ascontiguousarray(samples, dtype="<f4").tobytes()
        if len(record) != RECORD_BYTES:
            raise ValueError(f"frame {index} has {(len(record) - _HEAD.size) // 4} samples, not {SAMPLES_PER_FRAME}")
        appends.write_at(self.store, self.fd, self.frames * RECORD_BYTES, record)
        self.frames += 1
        self.states.append(index, state)

    def sync(self) -> int:
        """Makes every appended frame durable; returns how many that is."""
        frames = self.frames
        appends.sync(self.fd)
        self.states.sync()
        self.synced = frames
        return frames

    def discard(self) -> None:
        """Drops every frame (the file is kept, empty) and gives their bytes back to the store."""
        os.ftruncate(self.fd, 0)
        self.store.release(self.frames * RECORD_BYTES)
        self.frames = self.synced = 0
        self.states.discard()

    def close(self) -> None:
        os.close(self.fd)
        self.states.close()


def read_frames(path: Path, start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(index, segment, samples) of frames [start, stop) of a frames file."""
    if stop <= start:
        return
    with open(path, "rb") as f:
        f.seek(start * RECORD_BYTES)
        for expected in range(start, stop):
            record = f.read(RECORD_BYTES)
            if len(record) < RECORD_BYTES:
                raise EOFError(f"{path}: frame {expected} is not there")
            index, segment = _HEAD.unpack_from(record)
            if index != expected:
                raise ValueError(f"{path}: record {expected} holds frame {index}")
            yield index, segment, np.frombuffer(record, dtype="<f4", offset=_HEAD.size)


def read_samples(path: Path, frames: int, batch_frames: int = 256) -> Iterator[np.ndarray]:
    """The samples of frames [0, frames), a batch of frames at a time."""
    for start in range(0, frames, batch_frames):
        yield np.concatenate([s for _, _, s in read_frames(path, start, min(frames, start + batch_frames))])

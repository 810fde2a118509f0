"""What a resume rebuilds a job's stream from, one record per frame beside its audio (services/jobs/frame_log.py).

A record holds what GeneratedFrame carries besides the audio: the tokens other than speech the model chose right
before the frame (audio_eos, audio_bos), and the frame's latent and semantic features, float32. With them the
llm rebuilds its three branches and the acoustic service its convolution state and noise generator
(services/llm/prefill_plan.py, services/acoustic/engine.py), so a resumed job goes on from its checkpoint
instead of making its segment again.

    header:  b"VVRS", version, latent size, semantic size, token slots   (uint16 each, little-endian)
    record:  frame index (uint64), tokens before it (uint32; NO_STATE: none kept), TOKEN_SLOTS int32 tokens,
             latent and semantic features (float32)

Records are fixed-size and follow the frames file's indices: record k is frame k's. The file starts with the
first frame that carried state (frames before it, e.g. stored before this log existed, get NO_STATE records), is
fsynced with the frames file before each checkpoint, and is cut back to the checkpoint when it is opened, as the
frames file is. A frame whose state is missing or does not fit a record is NO_STATE: a resume across it makes its
segment again, as a job stored without this log does.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vibevoice.mesh.v1 import mesh_pb2

from services.common.wire_arrays import array_proto, as_numpy
from services.jobs.appends import sync, write_at
from services.jobs.store import Store

_HEADER = struct.Struct("<4sHHHH")
_MAGIC, _VERSION = b"VVRS", 1
_HEAD = struct.Struct("<QI")
TOKEN_SLOTS = 8  # tokens kept before one frame; a model that chooses more between two frames is not rebuilt there
NO_STATE = 0xFFFFFFFF


@dataclass(frozen=True)
class FrameState:
    tokens_before: list[int]
    latent: np.ndarray  # (latent,) float32
    semantic: np.ndarray  # (semantic,) float32

    @classmethod
    def of(cls, frame: mesh_pb2.GeneratedFrame) -> FrameState | None:
        """The frame's state, or None when its llm sent none."""
        if not frame.HasField("latent") or not frame.HasField("semantic"):
            return None
        latent, semantic = (as_numpy(t).astype(np.float32).reshape(-1) for t in (frame.latent, frame.semantic))
        return cls(list(frame.tokens_before), latent, semantic)


class StateLog:
    """The writer and reader of one job's frame states."""

    def __init__(self, store: Store, path: Path, checkpoint: int) -> None:
        self.store = store
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        self.sizes: tuple[int, int] | None = None  # (latent, semantic), from the header
        kept = 0
        if size >= _HEADER.size:
            magic, version, latent, semantic, slots = _HEADER.unpack(os.pread(self.fd, _HEADER.size, 0))
            if (magic, version, slots) == (_MAGIC, _VERSION, TOKEN_SLOTS):
                self.sizes = latent, semantic
                kept = min(checkpoint, (size - _HEADER.size) // self.record_bytes)
        # Records past the checkpoint may be torn; an unknown header is dropped with them.
        keep_bytes = _HEADER.size + kept * self.record_bytes if self.sizes else 0
        os.ftruncate(self.fd, keep_bytes)
        store.release(size - keep_bytes)
        self.frames = kept

    @property
    def record_bytes(self) -> int:
        latent, semantic = self.sizes
        return _HEAD.size + 4 * (TOKEN_SLOTS + latent + semantic)

    def append(self, index: int, state: FrameState | None) -> None:
        """Frame `index`'s state (None: none to keep); frames before it that have no record get NO_STATE."""
        if self.sizes is None:
            if state is None:
                return  # nothing kept yet: the log starts with the first frame that has state
            sizes = len(state.latent), len(state.semantic)
            self._write(0, _HEADER.pack(_MAGIC, _VERSION, *sizes, TOKEN_SLOTS))
            self.sizes = sizes  # only once its header is written: a failed write leaves the log as it was
        if index < self.frames:
            return  # a frame made again on a resume that could not rebuild: its record is there
        while self.frames < index:
            self._append_record(self.frames, None)
        self._append_record(index, state)

    def _append_record(self, index: int, state: FrameState | None) -> None:
        latent, semantic = self.sizes
        fits = (
            state is not None
            and len(state.tokens_before) <= TOKEN_SLOTS
            and (len(state.latent), len(state.semantic)) == (latent, semantic)
        )
        tokens = np.zeros(TOKEN_SLOTS, dtype="<i4")
        features = np.zeros(latent + semantic, dtype="<f4")
        count = NO_STATE
        if fits:
            count = len(state.tokens_before)
            tokens[:count] = state.tokens_before
            features[:latent], features[latent:] = state.latent, state.semantic
        record = _HEAD.pack(index, count) + tokens.tobytes() + features.tobytes()
        self._write(_HEADER.size + index * self.record_bytes, record)
        self.frames = index + 1

    def _write(self, offset: int, data: bytes) -> None:
        write_at(self.store, self.fd, offset, data)

    def history(self, first: int, stop: int) -> tuple[mesh_pb2.ResumeHistory | None, str]:
        """The ResumeHistory of frames [first, stop) (one llm stream's), or (None, why it cannot be rebuilt)."""
        if stop <= first:
            return None, "no frame of the segment is stored"
        if self.sizes is None or self.frames < stop:
            return None, f"frame states are kept for {self.frames if self.sizes else 0} of its {stop} frames"
        latent, semantic = self.sizes
        size = self.record_bytes
        data = os.pread(self.fd, (stop - first) * size, _HEADER.size + first * size)
        head = np.dtype({"names": ["index", "count"], "formats": ["<u8", "<u4"], "offsets": [0, 8], "itemsize": size})
        heads = np.frombuffer(data, dtype=head, count=stop - first)
        if np.any(heads["count"] == NO_STATE):
            missing = first + int(np.argmax(heads["count"] == NO_STATE))
            return None, f"frame {missing} was stored without its state"
        if not np.array_equal(heads["index"], np.arange(first, stop)):
            return None, "the state records are out of order"
        rows = np.frombuffer(data, dtype="<u1").reshape(stop - first, size)[:, _HEAD.size :]
        tokens = rows[:, : 4 * TOKEN_SLOTS].copy().view("<i4")
        features = rows[:, 4 * TOKEN_SLOTS :].copy().view("<f4")
        counts = heads["count"].astype(int)
        return (
            mesh_pb2.ResumeHistory(
                tokens_before=counts.tolist(),
                tokens=[int(t) for row, n in zip(tokens, counts, strict=True) for t in row[:n]],
                latents=array_proto(features[:, :latent]),
                semantic=array_proto(features[:, latent : latent + semantic]),
            ),
            "",
        )

    def sync(self) -> None:
        sync(self.fd)

    def discard(self) -> None:
        size = os.fstat(self.fd).st_size
        os.ftruncate(self.fd, 0)
        self.store.release(size)
        self.sizes, self.frames = None, 0

    def close(self) -> None:
        os.close(self.fd)

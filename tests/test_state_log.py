"""The frame-state log: records beside the frames, cut back to the checkpoint, and the history a resume sends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vibevoice.mesh.v1 import mesh_pb2

from services.common.tensors import from_proto, to_proto
from services.jobs.frame_log import FrameLog
from services.jobs.state_log import TOKEN_SLOTS, FrameState
from services.jobs.store import Store
from tests.test_job_store import new_job

SAMPLES = np.zeros(3200, dtype=np.float32)


def state(i: int, tokens: list[int] | None = None) -> FrameState:
    return FrameState(tokens or [], np.full(4, i, np.float32), np.full(6, -i, np.float32))


def test_frame_of_a_generated_frame_without_state_has_none():
    assert FrameState.of(mesh_pb2.GeneratedFrame(index=3)) is None
    frame = mesh_pb2.GeneratedFrame(
        tokens_before=[5, 6], latent=to_proto(torch.ones(4)), semantic=to_proto(torch.zeros(6))
    )
    got = FrameState.of(frame)
    assert got.tokens_before == [5, 6] and got.latent.tolist() == [1.0] * 4


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    new_job(s, "j")
    yield s
    s.close()


def test_history_of_a_segment_and_the_cut_back_to_the_checkpoint(store):
    log = FrameLog(store, "j", 0)
    for i in range(6):
        log.append(i, 0, SAMPLES, state(i, [7] * (i % 3)))
    log.sync()
    log.close()
    reopened = FrameLog(store, "j", 4)  # frames 4 and 5 were not checkpointed
    assert reopened.states.frames == 4
    history, why = reopened.states.history(1, 4)
    assert why == ""
    assert list(history.tokens_before) == [1, 2, 0] and list(history.tokens) == [7, 7, 7]
    assert from_proto(history.latents)[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert from_proto(history.semantic).shape == (3, 6) and from_proto(history.semantic)[2, 0] == -3.0
    reopened.close()


def test_frames_without_state_make_a_resume_across_them_impossible(store):
    log = FrameLog(store, "j", 0)
    log.append(0, 0, SAMPLES)  # an llm that sent no state: nothing kept yet
    log.append(1, 0, SAMPLES, state(1))
    log.append(2, 0, SAMPLES, state(2, [9] * (TOKEN_SLOTS + 1)))  # more tokens than a record keeps
    log.append(3, 0, SAMPLES, state(3))
    assert log.states.history(0, 4) == (None, "frame 0 was stored without its state")
    assert log.states.history(3, 4)[0] is not None
    assert log.states.history(1, 4) == (None, "frame 2 was stored without its state")
    assert log.states.history(3, 5)[1] == "frame states are kept for 4 of its 5 frames"
    log.close()


def test_a_discarded_log_gives_its_bytes_back(store):
    used = store.used_bytes
    log = FrameLog(store, "j", 0)
    log.append(0, 0, SAMPLES, state(0))
    log.discard()
    assert store.used_bytes == used and log.states.frames == 0
    log.close()

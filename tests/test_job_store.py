"""The job store alone: the state machine, checkpoints that survive a torn tail, the quota, and deletion."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from services.common.frames import SAMPLES_PER_FRAME
from services.jobs import store as s
from services.jobs.frame_log import RECORD_BYTES, FrameLog, read_frames


def new_job(store: s.Store, job_id: str = "a", owner: str = "k") -> s.JobRecord:
    store.write_request(job_id, b"request")
    return store.insert(
        job_id=job_id,
        owner=owner,
        request_hash=s.request_hash(b"request"),
        request_id="r",
        format=2,
        seed=2**64 - 1,
        estimated_frames=10,
        header=b"",
    )


def frame(i: int) -> np.ndarray:
    return np.full(SAMPLES_PER_FRAME, i / 100, dtype=np.float32)


def test_states_move_only_along_the_machine(tmp_path):
    store = s.Store(tmp_path)
    job = new_job(store)
    assert (job.state, job.seed, job.start_time) == (s.QUEUED, 2**64 - 1, None)
    with pytest.raises(s.TransitionError):
        store.transition("a", s.SUCCEEDED)
    running = store.transition("a", s.RUNNING)
    assert running.start_time is not None and running.end_time is None
    requeued = store.transition("a", s.QUEUED, resumes=1)
    assert store.transition("a", s.RUNNING).start_time == running.start_time == requeued.start_time
    done = store.transition("a", s.SUCCEEDED, finish_reason="eos")
    assert done.end_time is not None and done.finish_reason == "eos"
    for state in (s.RUNNING, s.QUEUED, s.FAILED, s.CANCELLED):
        with pytest.raises(s.TransitionError):
            store.transition("a", state)
    # The record is in WAL mode and outlives the process that wrote it.
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    assert s.Store(tmp_path).get("a").state == s.SUCCEEDED


def test_a_log_reopened_at_its_checkpoint_drops_the_torn_tail(tmp_path):
    store = s.Store(tmp_path)
    new_job(store)
    log = FrameLog(store, "a", 0)
    for i in range(5):
        log.append(i, i // 3, frame(i))
    store.checkpoint("a", log.sync())
    log.append(5, 1, frame(5))
    log.close()
    with open(store.frames_path("a"), "ab") as f:
        f.write(b"\x01" * 100)  # a record torn by a crash
    log = FrameLog(store, "a", store.get("a").frames_done)
    assert log.frames == 5 and os.path.getsize(store.frames_path("a")) == 5 * RECORD_BYTES
    with pytest.raises(ValueError):
        log.append(7, 0, frame(7))
    log.append(5, 2, frame(5))
    frames = list(read_frames(store.frames_path("a"), 3, 6))
    assert [(i, seg) for i, seg, _ in frames] == [(3, 1), (4, 1), (5, 2)]
    assert np.array_equal(frames[-1][2], frame(5))


def test_the_quota_refuses_the_frame_that_passes_it_and_nothing_else(tmp_path):
    store = s.Store(tmp_path, max_bytes=len(b"request") * 2 + 3 * RECORD_BYTES)
    new_job(store, "a")
    new_job(store, "b")
    a, b = FrameLog(store, "a", 0), FrameLog(store, "b", 0)
    a.append(0, 0, frame(0))
    b.append(0, 0, frame(0))
    a.append(1, 0, frame(1))
    with pytest.raises(s.StoreFull):
        b.append(1, 0, frame(1))
    assert os.path.getsize(store.frames_path("b")) == RECORD_BYTES
    assert os.path.getsize(store.frames_path("a")) == 2 * RECORD_BYTES
    # Deleting a job gives its bytes back.
    store.delete("a")
    assert not store.job_dir("a").exists() and store.get("a") is None
    b.append(1, 0, frame(1))
    # A reopened store counts what is on disk.
    assert s.Store(tmp_path, max_bytes=1).used_bytes == len(b"request") + 2 * RECORD_BYTES


def test_a_full_disk_fails_the_append_and_leaves_no_partial_record(tmp_path, monkeypatch):
    store = s.Store(tmp_path)
    new_job(store)
    log = FrameLog(store, "a", 0)
    log.append(0, 0, frame(0))
    used = store.used_bytes

    real_pwrite = os.pwrite

    def full(fd, data, offset):  # a few bytes land, then the disk is full
        if len(data) == RECORD_BYTES:
            return real_pwrite(fd, data[:100], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(s.StoreFull):
        log.append(1, 0, frame(1))
    assert os.path.getsize(store.frames_path("a")) == RECORD_BYTES and store.used_bytes == used


def test_orphaned_directories_are_removed(tmp_path):
    store = s.Store(tmp_path)
    store.write_request("lost", b"request")  # its record was never written
    new_job(store, "kept")
    assert store.remove_orphans() == ["lost"]
    assert not store.job_dir("lost").exists() and store.job_dir("kept").exists()


def test_a_store_made_before_the_pauses_column_gets_it(tmp_path):
    store = s.Store(tmp_path)
    new_job(store)
    store.db.execute("ALTER TABLE jobs DROP COLUMN pauses")
    store.close()
    reopened = s.Store(tmp_path)
    assert reopened.get("a").pauses == 0
    reopened.transition("a", s.RUNNING)
    assert reopened.transition("a", s.QUEUED, pauses=1).pauses == 1

"""Jobs interrupted mid-run: a killed llm, restarts of the gateway and of Envoy, and live calls that need the
llm's rows. Real processes, the tiny model on the CPU, one mesh for the module whose llm decodes two streams,
so two live calls fill it. Waits are bounded by deadlines that guard against hangs and measure nothing."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from vibevoice.mesh.v1 import mesh_pb2
from vibevoice.tts.v1 import jobs_pb2, tts_pb2

from services.client import build_request, synthesize
from services.jobs import store as states
from services.jobs.frame_log import RECORD_BYTES, read_frames
from services.jobs.runner import Run, Runner
from services.jobs.store import Store
from services.mesh import Mesh
from tests.conftest import TWO_ROWS, cancel_open_jobs, wait_until_idle
from tests.test_job_store import new_job
from tests.test_jobs import (
    DEADLINE_S,
    SCRIPT,
    assert_close,
    capacity,
    create,
    get,
    jobs,
    key,
    request,
    restart,
    samples,
    succeeded,
    wait_for,
    watch,
)

SLOTS = TWO_ROWS
FRAMES = 120  # a job long enough to interrupt after its checkpoint of 30 frames
SEED = 5


@pytest.fixture(scope="module")
def two_rows(two_row_mesh):
    """The session's two-row mesh, once no stream of an earlier test is left in its llm. Afterwards no job of these
    tests is left to take a row from the tests that share the mesh next."""
    yield wait_until_idle(two_row_mesh)
    cancel_open_jobs(two_row_mesh, ("tests",))


@pytest.fixture(scope="module")
def uninterrupted(two_rows) -> np.ndarray:
    """The audio of the request every interrupted job here runs, made by a job nothing interrupted."""
    job = wait_for(two_rows, create(two_rows, "uninterrupted", request(FRAMES, seed=SEED)).name, succeeded)
    assert (job.resumes, job.pauses, job.frames_done) == (0, 0, FRAMES)
    return samples(two_rows, job.name)


def stored_indices(mesh: Mesh, job_id: str) -> list[int]:
    """The frame indices the job's frames file holds, in order (read_frames checks each record's own)."""
    path = Path(mesh.jobs_config.data_dir) / "jobs" / job_id / "frames"
    records, rest = divmod(path.stat().st_size, RECORD_BYTES)
    assert rest == 0
    return [index for index, _, _ in read_frames(path, 0, records)]


def audio_chunks(responses: list[tts_pb2.SynthesizeResponse]) -> list[tts_pb2.AudioChunk]:
    return [r.audio for r in responses if r.WhichOneof("event") == "audio"]


def test_a_killed_llm_resumes_its_job_to_the_same_audio_frame_for_frame(two_rows, uninterrupted):
    job = create(two_rows, "llm-killed", request(FRAMES, seed=SEED))
    watched: list = []
    watcher = threading.Thread(target=lambda: watched.extend(watch(two_rows, job.name)))
    watcher.start()
    wait_for(two_rows, job.name, lambda j: j.frames_checkpointed >= 30)
    restart(two_rows, "llm")
    done = wait_for(two_rows, job.name, succeeded)
    watcher.join(DEADLINE_S)
    assert done.resumes >= 1 and done.frames_done == FRAMES
    # Every resume rebuilt the stream from the stored frame states; none made a stored frame again.
    assert (done.rebuilds, done.frames_regenerated) == (done.resumes, 0)
    # No frame lost or sent twice, to the watch that followed the job through the kill or in the file.
    assert [c.frame_index for c in audio_chunks(watched)] == list(range(FRAMES))
    assert stored_indices(two_rows, "llm-killed") == list(range(FRAMES))
    assert_close(samples(two_rows, job.name), uninterrupted)


def test_a_killed_acoustic_service_resumes_its_job_to_the_same_audio(two_rows, uninterrupted):
    """The acoustic service holds every stream's convolution state and noise generator: killed, the job goes on
    from its checkpoint with both rebuilt in the new process."""
    job = create(two_rows, "acoustic-killed", request(FRAMES, seed=SEED))
    wait_for(two_rows, job.name, lambda j: j.frames_checkpointed >= 30)
    restart(two_rows, "acoustic")
    done = wait_for(two_rows, job.name, succeeded)
    assert done.resumes >= 1 and done.frames_done == FRAMES
    assert (done.rebuilds, done.frames_regenerated) == (done.resumes, 0)
    assert stored_indices(two_rows, "acoustic-killed") == list(range(FRAMES))
    assert_close(samples(two_rows, job.name), uninterrupted)


OWN_SEED = 0  # the tiny model's own decisions: 8 frames in four speech segments, audio_eos and audio_bos between
OWN_CUT = 6  # after the frames that followed audio_bos; audio_eos, audio_bos and two more frames to come


def segments_stored(mesh: Mesh, job_id: str) -> list[int]:
    path = Path(mesh.jobs_config.data_dir) / "jobs" / job_id / "frames"
    return [segment for _, segment, _ in read_frames(path, 0, path.stat().st_size // RECORD_BYTES)]


def stopped_at(mesh: Mesh, source: str, job_id: str, checkpoint: int, with_states: bool = True) -> None:
    """A copy of a finished job as a kill -9 of the jobs service leaves it at a checkpoint of `checkpoint` frames:
    RUNNING, its files holding every frame (those past the checkpoint not durable yet). The model's own decisions
    end the tiny model's jobs within one checkpoint interval, where a real kill cannot land for certain."""
    mesh.stop_service("jobs", sig=signal.SIGKILL)
    store = Store(Path(mesh.jobs_config.data_dir))
    try:
        for table in ("jobs", "job_segments"):
            names = [r["name"] for r in store.db.execute(f"PRAGMA table_info({table})") if r["name"] != "seq"]
            picked = ", ".join("?" if n == "job_id" else n for n in names)
            store.db.execute(
                f"INSERT INTO {table} ({', '.join(names)}) SELECT {picked} FROM {table} WHERE job_id = ?",
                (job_id, source),
            )
        store.db.execute(
            "UPDATE jobs SET state = ?, frames_done = ?, end_time = NULL, checks = NULL WHERE job_id = ?",
            (states.RUNNING, checkpoint, job_id),
        )
        shutil.copytree(store.job_dir(source), store.job_dir(job_id))
        if not with_states:  # as stored before frame states were kept
            store.state_path(job_id).unlink()
    finally:
        store.close()
    mesh.start_service("jobs")
    mesh.wait_ready(120, ["jobs"])


def test_a_job_of_the_models_own_decisions_resumes_after_a_new_speech_segment_to_the_same_audio(two_rows):
    whole = wait_for(two_rows, create(two_rows, "own-whole", request(None, seed=OWN_SEED)).name, succeeded)
    segments = segments_stored(two_rows, "own-whole")
    assert whole.frames_done == len(segments) > OWN_CUT and len(set(segments[:OWN_CUT])) < len(set(segments))
    stopped_at(two_rows, "own-whole", "own-resumed", OWN_CUT)
    done = wait_for(two_rows, "jobs/own-resumed", succeeded)
    assert (done.resumes, done.rebuilds, done.frames_regenerated) == (1, 1, 0)
    assert (done.frames_done, done.finish_reason) == (whole.frames_done, whole.finish_reason)
    assert segments_stored(two_rows, "own-resumed") == segments
    assert_close(samples(two_rows, done.name), samples(two_rows, whole.name))


def test_a_job_stored_without_frame_states_resumes_by_making_its_segment_again(two_rows, uninterrupted):
    """A job stored before frame states were kept: the resume falls back to the segment's first frame."""
    stopped_at(two_rows, "uninterrupted", "no-states", 45, with_states=False)
    done = wait_for(two_rows, "jobs/no-states", succeeded)
    assert (done.rebuilds, done.frames_regenerated, done.frames_done) == (0, 45, FRAMES)
    assert_close(samples(two_rows, done.name), uninterrupted)


def test_gateway_and_envoy_restarts_leave_a_job_and_its_watch_as_they_were(two_rows):
    """FLAC carries the codec's state from frame to frame: the hardest case for a watch from frame k."""
    frames = 300  # about four times what it makes while both restart
    job = create(two_rows, "proxies-restart", request(frames, fmt=tts_pb2.AUDIO_FORMAT_FLAC, seed=SEED))
    first: list = []

    def follow() -> None:
        with contextlib.suppress(grpc.RpcError):  # Envoy's restart ends it
            first.extend(jobs(two_rows).WatchJob(jobs_pb2.WatchJobRequest(name=job.name), metadata=key("tests")))

    watcher = threading.Thread(target=follow)
    watcher.start()
    wait_for(two_rows, job.name, lambda j: j.frames_done >= 10)
    restart(two_rows, "gateway")
    two_rows.stop_service("envoy", sig=signal.SIGKILL)
    watcher.join(DEADLINE_S)
    two_rows.start_service("envoy")
    two_rows.wait_ready(120, ["envoy"])
    before = get(two_rows, job.name)
    seen = audio_chunks(first)
    k = seen[-1].frame_index + 1
    assert before.state == jobs_pb2.JOB_STATE_RUNNING and k < before.frames_done < frames, before
    after = watch(two_rows, job.name, from_frame=k)  # a client that had frames up to k - 1 goes on
    done = wait_for(two_rows, job.name, succeeded)
    assert (done.resumes, done.frames_done) == (0, frames)
    replay = watch(two_rows, job.name)
    assert replay[-1].summary.frames == after[-1].summary.frames == frames
    replayed = audio_chunks(replay)
    assert seen == replayed[: len(seen)] and audio_chunks(after) == [c for c in replayed if c.frame_index >= k]


def test_live_calls_pause_a_job_that_holds_the_rows_they_need(two_rows, uninterrupted):
    job = create(two_rows, "paused", request(FRAMES, seed=SEED))
    wait_for(two_rows, job.name, lambda j: j.frames_done >= 20)
    assert capacity(two_rows).active == 1
    live = [build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, seed=30 + i, fixed_frames=40) for i in range(SLOTS)]
    address = f"127.0.0.1:{two_rows.ports.envoy}"
    with ThreadPoolExecutor(SLOTS) as pool:
        results = list(pool.map(lambda r: synthesize(address, r, timeout=DEADLINE_S), live))
    during = get(two_rows, job.name)
    assert [r.summary.frames for r in results] == [40] * SLOTS
    # Served while the job waited, not after it: the job gave its row up and has not finished.
    assert during.state != jobs_pb2.JOB_STATE_SUCCEEDED and during.pauses >= 1, during
    done = wait_for(two_rows, job.name, succeeded)
    assert done.resumes == 0 and done.frames_done == FRAMES
    assert done.rebuilds >= 1 and done.frames_regenerated == 0  # it went on from its checkpoint
    assert stored_indices(two_rows, "paused") == list(range(FRAMES))
    assert_close(samples(two_rows, job.name), uninterrupted)


def test_live_streams_waiting_pause_jobs_not_streaming_yet_then_those_with_the_fewest_frames(tmp_path):
    """The choice alone: runs of jobs whose tasks wait forever, one paused job per live stream waiting."""

    async def main() -> list[tuple[str, str, int]]:
        store = Store(tmp_path)
        runner = Runner(store, backends=None, max_running=4, reserve=0.25)
        for job_id, frames, streaming in (("long", 90, True), ("short", 30, True), ("starting", 0, False)):
            new_job(store, job_id)
            store.transition(job_id, states.RUNNING)
            run = Run(frames=frames, streaming=streaming)
            run.task = asyncio.create_task(asyncio.Event().wait())
            runner.runs[job_id] = run
        await runner._pause_for_live(mesh_pb2.CapacityResponse(waiting_live=1))
        return [(j, store.get(j).state, store.get(j).pauses) for j in ("long", "short", "starting")]

    assert asyncio.run(main()) == [
        ("long", states.RUNNING, 0),
        ("short", states.QUEUED, 1),
        ("starting", states.QUEUED, 1),
    ]

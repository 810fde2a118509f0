"""The Jobs API through Envoy: real processes, the tiny model on the CPU, one mesh for the module.

Jobs are made long enough to interrupt with `fixed_frames`; waits are bounded by deadlines that guard against
hangs and measure nothing.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from google.rpc import code_pb2
from grpc_status import rpc_status
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import jobs_pb2, jobs_pb2_grpc, tts_pb2

from services.client import build_request, synthesize
from services.common.errors import bad_request_fields
from services.common.frames import SAMPLES_PER_FRAME
from services.jobs.frame_log import RECORD_BYTES
from services.mesh import Mesh
from tests.conftest import SCRIPTS, VOICES, cancel_open_jobs, wait_until_idle
from tests.test_api import grpcurl

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (SCRIPTS / "2p_short.txt").read_text()
DEADLINE_S = 300.0
CLI_JOB_FRAMES = 200
# Frames the job must still have to make when the first watch is interrupted: a watch of a finished job replays
# every stored frame faster than a signal reaches it.
CLI_JOB_LEFT = 100


@pytest.fixture(scope="module", autouse=True)
def _no_job_left(mesh):
    """These tests share the session's mesh: none of their jobs is left running for the modules after them."""
    yield
    cancel_open_jobs(mesh, ("tests", "cli", "grpcurl"))


@pytest.fixture
def jobs_mesh(mesh):
    """The session's mesh, once no stream of an earlier test is left in its llm (these tests count them)."""
    return wait_until_idle(mesh)


def jobs(mesh: Mesh) -> jobs_pb2_grpc.JobsStub:
    return jobs_pb2_grpc.JobsStub(grpc.insecure_channel(f"127.0.0.1:{mesh.ports.envoy}"))


def key(name: str) -> list[tuple[str, str]]:
    return [("x-api-key", name)]


def request(frames: int | None = 40, fmt: int = tts_pb2.AUDIO_FORMAT_PCM_F32, seed: int = 7, **options):
    return build_request(SCRIPT, {}, fmt, seed=seed, fixed_frames=frames, **options)


def create(mesh: Mesh, job_id: str, req: tts_pb2.SynthesizeRequest, owner: str = "tests") -> jobs_pb2.Job:
    created = jobs(mesh).CreateJob(jobs_pb2.CreateJobRequest(job_id=job_id, request=req), metadata=key(owner))
    return created.job


def get(mesh: Mesh, name: str, owner: str = "tests") -> jobs_pb2.Job:
    return jobs(mesh).GetJob(jobs_pb2.GetJobRequest(name=name), metadata=key(owner), timeout=30).job


def wait_for(mesh: Mesh, name: str, done, owner: str = "tests") -> jobs_pb2.Job:
    deadline = time.monotonic() + DEADLINE_S
    while not done(job := get(mesh, name, owner)):
        assert time.monotonic() < deadline, f"{name} never got there: {job}"
        time.sleep(0.1)
    return job


def succeeded(job: jobs_pb2.Job) -> bool:
    assert job.state not in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED), job
    return job.state == jobs_pb2.JOB_STATE_SUCCEEDED


def watch(mesh: Mesh, name: str, from_frame: int = 0, owner: str = "tests") -> list[tts_pb2.SynthesizeResponse]:
    call = jobs(mesh).WatchJob(jobs_pb2.WatchJobRequest(name=name, from_frame=from_frame), metadata=key(owner))
    return list(call)


def audio_bytes(responses: list[tts_pb2.SynthesizeResponse]) -> bytes:
    return b"".join(r.audio.data for r in responses if r.WhichOneof("event") == "audio")


def download(mesh: Mesh, name: str, fmt: int = tts_pb2.AUDIO_FORMAT_UNSPECIFIED) -> tuple[bytes, str, int]:
    parts = list(jobs(mesh).GetJobAudio(jobs_pb2.GetJobAudioRequest(name=name, format=fmt), metadata=key("tests")))
    return b"".join(p.data for p in parts), parts[0].media_type, parts[0].total_bytes


def samples(mesh: Mesh, name: str) -> np.ndarray:
    return np.frombuffer(download(mesh, name, tts_pb2.AUDIO_FORMAT_PCM_F32)[0], dtype="<f4")


def status_of(call) -> tuple[grpc.StatusCode, list[tuple[str, str]]]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    status = rpc_status.from_call(err.value)
    return err.value.code(), bad_request_fields(status) if status else []


def capacity(mesh: Mesh) -> mesh_pb2.CapacityResponse:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.llm}") as ch:
        return mesh_pb2_grpc.LLMStub(ch).Capacity(mesh_pb2.CapacityRequest(), timeout=10)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.size
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)), np.max(np.abs(a - b))


# --- every call, every state ---


def test_a_job_runs_is_watched_listed_and_downloaded(jobs_mesh):
    created = create(jobs_mesh, "every-call", request(40))
    assert created.name == "jobs/every-call" and created.state == jobs_pb2.JOB_STATE_QUEUED
    assert (created.owner, created.request_id, created.seed, created.estimated_frames) == ("tests", "every-call", 7, 40)
    stream = watch(jobs_mesh, created.name)
    kinds = [r.WhichOneof("event") for r in stream]
    assert kinds[0] == "header" and kinds[-1] == "summary" and "progress" in kinds
    chunks = [r.audio for r in stream if r.WhichOneof("event") == "audio"]
    assert [c.frame_index for c in chunks] == list(range(40))
    assert stream[0].header.max_frames == 40 and stream[-1].summary.finish_reason == "fixed_frames"

    job = get(jobs_mesh, created.name)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.progress_percent == 100
    assert job.frames_done == job.frames_checkpointed == 40 and job.finish_reason == "fixed_frames"
    assert job.create_time.ToNanoseconds() <= job.start_time.ToNanoseconds() <= job.end_time.ToNanoseconds()
    assert [(s.first_frame, s.frames, s.turns) for s in job.segments] == [(0, 40, 2)]
    assert job.audio_checks.HasField("integrated_loudness_lufs") and job.audio_checks.clipped_samples >= 0

    # The file, in every format, holds the watched audio; PCM float is the very samples.
    f32 = samples(jobs_mesh, created.name)
    assert f32.tobytes() == audio_bytes(stream)
    for fmt, media in ((tts_pb2.AUDIO_FORMAT_WAV, "audio/wav"), (tts_pb2.AUDIO_FORMAT_FLAC, "audio/flac")):
        data, media_type, total = download(jobs_mesh, created.name, fmt)
        assert media_type == media and total == len(data)
        with sf.SoundFile(io.BytesIO(data)) as f:
            assert f.frames == 40 * SAMPLES_PER_FRAME  # the header says the real length
            assert np.allclose(f.read(dtype="float32"), f32, atol=2 / 32767)

    # Listing: the caller's jobs only, newest first, in pages.
    second = create(jobs_mesh, "every-call-2", request(2))
    wait_for(jobs_mesh, second.name, succeeded)
    first_page = jobs(jobs_mesh).ListJobs(jobs_pb2.ListJobsRequest(page_size=1), metadata=key("tests"))
    assert [j.name for j in first_page.jobs] == ["jobs/every-call-2"] and first_page.next_page_token
    rest = jobs(jobs_mesh).ListJobs(
        jobs_pb2.ListJobsRequest(page_size=1000, page_token=first_page.next_page_token), metadata=key("tests")
    )
    assert "jobs/every-call" in [j.name for j in rest.jobs] and "jobs/every-call-2" not in [j.name for j in rest.jobs]
    assert not jobs(jobs_mesh).ListJobs(jobs_pb2.ListJobsRequest(), metadata=key("someone-else")).jobs
    code, _ = status_of(lambda: get(jobs_mesh, created.name, owner="someone-else"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = status_of(
        lambda: jobs(jobs_mesh).CancelJob(jobs_pb2.CancelJobRequest(name=created.name), metadata=key("tests"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.CreateJob(jobs_pb2.CreateJobRequest()), "request"),
        (lambda s: s.CreateJob(jobs_pb2.CreateJobRequest(job_id="Bad_Id", request=request())), "job_id"),
        (lambda s: s.CreateJob(jobs_pb2.CreateJobRequest(request=request(cfg_scale=0.0))), "request.options.cfg_scale"),
        (
            lambda s: s.CreateJob(jobs_pb2.CreateJobRequest(request=tts_pb2.SynthesizeRequest(text="no speakers"))),
            "request.text",
        ),
        (lambda s: s.GetJob(jobs_pb2.GetJobRequest(name="every-call")), "name"),
        (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(page_size=-1)), "page_size"),
        (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(page_token="nonsense")), "page_token"),
        (lambda s: list(s.GetJobAudio(jobs_pb2.GetJobAudioRequest(name="jobs/every-call", format=99))), "format"),
    ],
)
def test_bad_requests_name_the_field(jobs_mesh, call, field):
    code, fields = status_of(lambda: call(jobs(jobs_mesh)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields and fields[0][0] == field, fields


HOSTILE_NAMES = ["jobs/../../etc/passwd", "jobs/" + "a" * 10_000, "jobs/é", "jobs/a\x00b", "", "jobs/", "jobs/a/b",
                 "JOBS/x", "jobs/-a", "jobs/" + "a" * 64, "x" * 70_000, "jobs/%2e%2e"]  # fmt: skip


def test_hostile_calls_get_a_precise_answer(jobs_mesh):
    """Names, page tokens, offsets and raw bodies no client library would send, straight to the jobs service (through
    Envoy its rate limiter answers most of them first): each is answered, never with INTERNAL or UNKNOWN."""
    rng = random.Random(7)
    channel = grpc.insecure_channel(f"127.0.0.1:{jobs_mesh.ports.jobs}")
    stub = jobs_pb2_grpc.JobsStub(channel)
    calls: list[tuple] = []  # (method, request)
    for name in HOSTILE_NAMES:
        calls += [
            (stub.GetJob, jobs_pb2.GetJobRequest(name=name)),
            (stub.CancelJob, jobs_pb2.CancelJobRequest(name=name)),
            (stub.DeleteJob, jobs_pb2.DeleteJobRequest(name=name)),
            (stub.WatchJob, jobs_pb2.WatchJobRequest(name=name, from_frame=2**64 - 1)),
            (stub.GetJobAudio, jobs_pb2.GetJobAudioRequest(name=name, format=-3)),
        ]
    for token in ["x", "=" * 100, "A" * 5000, "bm9uc2Vuc2U=", "LTE=", "OTk5OTk5OTk5OTk5OTk5OTk5OTk5"]:
        sizes = (0, -(2**31), 2**31 - 1)
        calls += [(stub.ListJobs, jobs_pb2.ListJobsRequest(page_size=n, page_token=token)) for n in sizes]
    for method in ["CreateJob", "GetJob", "ListJobs", "CancelJob", "DeleteJob", "WatchJob", "GetJobAudio"]:
        kind = channel.unary_stream if method in ("WatchJob", "GetJobAudio") else channel.unary_unary
        raw = kind(f"/vibevoice.tts.v1.Jobs/{method}", request_serializer=bytes, response_deserializer=bytes)
        calls += [(raw, rng.randbytes(size)) for size in [1, 7, 100, 5000] * 3]

    def code_of(method, req) -> grpc.StatusCode:
        try:
            answer = method(req, metadata=key("tests"), timeout=10)
            if not isinstance(answer, (bytes, type(None))) and not hasattr(answer, "ListFields"):
                list(answer)  # a stream: read to its end
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    codes = {code_of(method, req) for method, req in calls}
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK}, codes
    assert grpc.StatusCode.INVALID_ARGUMENT in codes


def test_create_with_an_id_is_idempotent(jobs_mesh):
    first = create(jobs_mesh, "same-id", request(3))
    again = create(jobs_mesh, "same-id", request(3))
    assert again.name == first.name and again.create_time == first.create_time
    code, _ = status_of(lambda: create(jobs_mesh, "same-id", request(4)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # Without an id every call is a new job.
    others = [create(jobs_mesh, "", request(3)), create(jobs_mesh, "", request(3))]
    assert others[0].name != others[1].name
    for job in [first, *others]:
        wait_for(jobs_mesh, job.name, succeeded)


def test_a_watch_from_frame_k_is_the_tail_of_a_full_watch(jobs_mesh):
    """FLAC carries the codec's state from frame to frame: the hardest case for starting in the middle."""
    job = create(jobs_mesh, "tail", request(90, fmt=tts_pb2.AUDIO_FORMAT_FLAC))
    live = watch(jobs_mesh, job.name)  # follows the job while it runs
    k = 37
    tail = watch(jobs_mesh, job.name, from_frame=k)  # replays the stored frames
    full_chunks = [r.audio for r in live if r.WhichOneof("event") == "audio"]
    tail_chunks = [r.audio for r in tail if r.WhichOneof("event") == "audio"]
    assert tail_chunks[0].frame_index == k
    assert tail_chunks == [c for c in full_chunks if c.frame_index >= k][-len(tail_chunks) :]
    assert b"".join(c.data for c in full_chunks).endswith(audio_bytes(tail))
    assert tail[-1].summary.frames == live[-1].summary.frames == 90
    code, fields = status_of(lambda: watch(jobs_mesh, job.name, from_frame=91))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields[0][0] == "from_frame"


def test_cancel_frees_the_llm_row_and_delete_removes_the_files(jobs_mesh):
    job = create(jobs_mesh, "to-cancel", request(5000))
    running = wait_for(jobs_mesh, job.name, lambda j: j.frames_done >= 20)
    assert running.state == jobs_pb2.JOB_STATE_RUNNING and running.HasField("estimated_time_left")
    assert capacity(jobs_mesh).active == 1
    code, _ = status_of(
        lambda: list(jobs(jobs_mesh).GetJobAudio(jobs_pb2.GetJobAudioRequest(name=job.name), metadata=key("tests")))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    cancelled = jobs(jobs_mesh).CancelJob(jobs_pb2.CancelJobRequest(name=job.name), metadata=key("tests")).job
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED and cancelled.frames_checkpointed >= 20
    # The llm lets the stream go at its next step.
    deadline = time.monotonic() + 60
    while capacity(jobs_mesh).active:
        assert time.monotonic() < deadline, capacity(jobs_mesh)
        time.sleep(0.05)
    # A watch replays what was made, then says the job was cancelled.
    call = jobs(jobs_mesh).WatchJob(jobs_pb2.WatchJobRequest(name=job.name), metadata=key("tests"))
    replayed = []
    with pytest.raises(grpc.RpcError) as err:
        replayed.extend(r for r in call if r.WhichOneof("event") == "audio")
    assert err.value.code() == grpc.StatusCode.CANCELLED and len(replayed) == cancelled.frames_checkpointed

    directory = Path(jobs_mesh.jobs_config.data_dir) / "jobs" / "to-cancel"
    assert (directory / "frames").stat().st_size >= cancelled.frames_checkpointed * RECORD_BYTES
    jobs(jobs_mesh).DeleteJob(jobs_pb2.DeleteJobRequest(name=job.name), metadata=key("tests"))
    assert not directory.exists()
    code, _ = status_of(lambda: get(jobs_mesh, job.name))
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_job_the_model_decides_equals_synthesize(jobs_mesh):
    voice = (VOICES / "en-Alice_woman.wav").read_bytes()
    req = build_request(SCRIPT, {1: voice}, tts_pb2.AUDIO_FORMAT_PCM_F32, seed=11)
    job = wait_for(jobs_mesh, create(jobs_mesh, "model-decides", req).name, succeeded)
    live = synthesize(f"127.0.0.1:{jobs_mesh.ports.envoy}", req, timeout=DEADLINE_S)
    assert job.finish_reason == live.summary.finish_reason and job.frames_done == live.summary.frames > 0
    assert_close(samples(jobs_mesh, job.name), np.frombuffer(live.data, dtype="<f4"))


def restart(mesh: Mesh, service: str) -> None:
    mesh.stop_service(service, sig=signal.SIGKILL)
    mesh.start_service(service)
    mesh.wait_ready(120, [service])


def test_a_killed_jobs_service_resumes_its_job_to_the_same_audio(jobs_mesh):
    job = create(jobs_mesh, "killed", request(150, seed=21))
    wait_for(jobs_mesh, job.name, lambda j: j.frames_checkpointed >= 30)
    restart(jobs_mesh, "jobs")
    resumed = wait_for(jobs_mesh, job.name, succeeded)
    assert resumed.resumes == 1 and resumed.frames_done == 150
    # It went on from its checkpoint with the stream rebuilt, making no stored frame again.
    assert (resumed.rebuilds, resumed.frames_regenerated) == (1, 0)
    uninterrupted = wait_for(jobs_mesh, create(jobs_mesh, "not-killed", request(150, seed=21)).name, succeeded)
    assert uninterrupted.resumes == 0
    assert_close(samples(jobs_mesh, job.name), samples(jobs_mesh, uninterrupted.name))


def test_a_job_that_fills_the_store_fails_alone(jobs_mesh):
    before = create(jobs_mesh, "stored-before", request(8, seed=3))
    wait_for(jobs_mesh, before.name, succeeded)
    stored = samples(jobs_mesh, before.name)
    data = Path(jobs_mesh.jobs_config.data_dir) / "jobs"
    used = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    room = 2 * len(request(8).SerializeToString(deterministic=True)) + 40 * RECORD_BYTES
    jobs_mesh.stop_service("jobs")
    jobs_mesh.jobs_args = ["--max-data-bytes", str(used + room)]
    try:
        jobs_mesh.start_service("jobs")
        jobs_mesh.wait_ready(120, ["jobs"])
        big = create(jobs_mesh, "too-big", request(400, seed=4))
        failed = wait_for(jobs_mesh, big.name, lambda j: j.state == jobs_pb2.JOB_STATE_FAILED)
        assert failed.error.code == code_pb2.RESOURCE_EXHAUSTED, failed.error
        assert "--max-data-bytes" in failed.error.message
        # Its frames were dropped, the other job's are as they were, and a job that fits still runs.
        assert (data / "too-big" / "frames").stat().st_size == 0
        assert samples(jobs_mesh, before.name).tobytes() == stored.tobytes()
        after = wait_for(jobs_mesh, create(jobs_mesh, "fits-after", request(8, seed=3)).name, succeeded)
        assert samples(jobs_mesh, after.name).tobytes() == stored.tobytes()
    finally:
        jobs_mesh.jobs_args = []
        restart(jobs_mesh, "jobs")


def test_grpcurl_reaches_jobs_through_envoy(jobs_mesh):
    """The README's examples: reflection through Envoy describes Jobs, and the calls reach the jobs service."""
    address = f"127.0.0.1:{jobs_mesh.ports.envoy}"
    options = {"seed": "7", "fixedFrames": 4}
    body = {"jobId": "grpcurl-1", "request": {"text": SCRIPT, "format": "AUDIO_FORMAT_WAV", "options": options}}
    owner = ["-H", "x-api-key: grpcurl"]
    out = grpcurl(*owner, address, "vibevoice.tts.v1.Jobs/CreateJob", data=json.dumps(body))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job"]["state"] == "JOB_STATE_QUEUED"
    wait_for(jobs_mesh, "jobs/grpcurl-1", succeeded, owner="grpcurl")
    out = grpcurl(*owner, address, "vibevoice.tts.v1.Jobs/ListJobs", data='{"pageSize": 10}')
    assert out.returncode == 0, out.stderr
    [job] = json.loads(out.stdout)["jobs"]
    assert (job["name"], job["state"], job["framesDone"]) == ("jobs/grpcurl-1", "JOB_STATE_SUCCEEDED", "4")


# --- the command line ---


def vvmesh(mesh: Mesh, *args: str) -> subprocess.CompletedProcess:
    address = ["--address", f"127.0.0.1:{mesh.ports.envoy}", "--api-key", "cli"]
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "job", *args, *address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )


def interrupted_watch(mesh: Mesh, script: Path, tmp_path: Path, frames: int) -> tuple[str | None, int, Path, list[str]]:
    """Submit a job of `frames` through the CLI, watch it, and Ctrl-C the watch once it has written 5 frames while
    the job still has CLI_JOB_LEFT to make. The watch's own start-up (a Python process) can outlast a short job on a
    loaded machine: then (None, ...) and the caller tries a longer one."""
    job_id = f"cli-job-{frames}"
    options = ["--job-id", job_id, "--format", "wav", "--fixed-frames", str(frames)]
    submitted = vvmesh(mesh, "submit", str(script), *options)
    assert submitted.returncode == 0 and f"jobs/{job_id}" in submitted.stdout, submitted.stderr
    out = tmp_path / f"{job_id}.wav"
    sidecar = out.with_name(out.name + ".watch")
    command = [sys.executable, "-m", "services.cli", "job", "watch", job_id, "-o", str(out)]
    command += ["--address", f"127.0.0.1:{mesh.ports.envoy}", "--api-key", "cli"]
    # Ctrl-C as a terminal sends it, whatever this process inherited (a background shell starts it ignoring SIGINT).
    first = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + DEADLINE_S
    while not (sidecar.exists() and json.loads(sidecar.read_text() or "{}").get("next_frame", 0) >= 5):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    mid_job = get(mesh, f"jobs/{job_id}", owner="cli").frames_done <= frames - CLI_JOB_LEFT
    first.send_signal(signal.SIGINT)
    code = first.wait(60)
    if not mid_job:
        return None, frames, out, command
    assert code == 130
    return job_id, frames, out, command


def test_the_cli_submits_watches_after_ctrl_c_and_downloads(jobs_mesh, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text(SCRIPT)
    for frames in (CLI_JOB_FRAMES, 4 * CLI_JOB_FRAMES, 16 * CLI_JOB_FRAMES):
        job_id, frames, out, command = interrupted_watch(jobs_mesh, script, tmp_path, frames)
        if job_id is not None:
            break
    assert job_id is not None, "every job ran to its end before its watch could be interrupted"
    sidecar = out.with_name(out.name + ".watch")
    stopped_at = json.loads(sidecar.read_text())["next_frame"]
    assert os.path.getsize(out) == json.loads(sidecar.read_text())["bytes"]
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S)
    assert second.returncode == 0, second.stderr
    assert not sidecar.exists() and f"{frames} frames" in second.stdout
    downloaded = tmp_path / "downloaded.wav"
    assert vvmesh(jobs_mesh, "download", job_id, "-o", str(downloaded)).returncode == 0
    assert out.read_bytes() == downloaded.read_bytes()  # the watched file, finished, is the job's file
    assert 0 < stopped_at < frames
    status = vvmesh(jobs_mesh, "status", f"jobs/{job_id}")
    assert "succeeded" in status.stdout and f"{frames} of about {frames} frames" in status.stdout
    listing = vvmesh(jobs_mesh, "list")
    assert any(line.startswith(f"jobs/{job_id}: succeeded") for line in listing.stdout.splitlines())
    cancelled = vvmesh(jobs_mesh, "cancel", job_id)
    assert cancelled.returncode == 1 and cancelled.stderr.startswith("error: FAILED_PRECONDITION")

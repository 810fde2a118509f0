"""Live streams beside two jobs, through Envoy: the largest gap between a live stream's audio chunks while two
long jobs run, against the 133 ms frame a player needs every 133 ms. Jobs run on spare capacity and are paused
when live calls wait for room (services/jobs/runner.py), so the gaps should stay within a frame.

    python bench/jobs_bench.py --shape tiny --device cpu     # the tiny model, a few minutes on a CPU
    python bench/jobs_bench.py --shape 1.5b                  # one GPU

With `--kill-at N` it runs one long job instead, watched from its first frame by a client: its wall time and
real-time factor, each GPU service's peak memory, and a resume: the llm killed (SIGKILL) once N frames are
checkpointed and started again, the time until the job made its first frame after the checkpoint (the llm's own
start-up counted apart), how it resumed (rebuilt or made again), the frames lost, and whether the stored file
equals the audio the client received.

    python bench/jobs_bench.py --shape 1.5b --job-frames 40500 --kill-at 20000

Writes bench/results/jobs-SHAPE.json (or $OUT/jobs-SHAPE.json).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import statistics
import threading
import time
from pathlib import Path

import common
import grpc
from gpu_memory import GpuMemorySampler
from mesh_bench import stream
from vibevoice.tts.v1 import jobs_pb2, jobs_pb2_grpc, tts_pb2, tts_pb2_grpc

from services.client import build_request
from services.common.frames import FRAME_MS, SAMPLES_PER_FRAME
from services.common.grpc_server import CHANNEL_OPTIONS
from services.mesh import Mesh, Ports

JOBS = 2
OWNER = (("x-api-key", "jobs-bench"),)


def request(frames: int, seed: int) -> tts_pb2.SynthesizeRequest:
    return build_request(common.SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, seed=seed, fixed_frames=frames)


async def job_states(stub: jobs_pb2_grpc.JobsStub, names: list[str]) -> list[jobs_pb2.Job]:
    return [(await stub.GetJob(jobs_pb2.GetJobRequest(name=n), metadata=OWNER)).job for n in names]


async def live_streams(stub: tts_pb2_grpc.TextToSpeechStub, args: argparse.Namespace, seed: int) -> dict:
    """`--live` streams arriving `--arrival-s` apart: their gaps between chunks and their first audio."""
    records = [{} for _ in range(args.live)]
    tasks = []
    for i, r in enumerate(records):
        tasks.append(asyncio.create_task(stream(stub, request(args.live_frames, seed + i), r)))
        await asyncio.sleep(args.arrival_s)
    await asyncio.gather(*tasks)
    failed = [r["status"] for r in records if r["status"] != "OK"]
    if failed:
        raise RuntimeError(f"{len(failed)} live streams failed: {failed[:3]}")
    gaps = sorted((b - a) * 1000 for r in records for a, b in zip(r["chunks"], r["chunks"][1:], strict=False))
    first_audio = sorted((r["chunks"][0] - r["sent"]) * 1000 for r in records)
    return {
        "max_gap_between_chunks_ms": gaps[-1],
        "p99_gap_between_chunks_ms": gaps[int(len(gaps) * 0.99)],
        "median_gap_between_chunks_ms": statistics.median(gaps),
        "first_audio_ms": {"p50": statistics.median(first_audio), "max": first_audio[-1]},
    }


async def run(address: str, args: argparse.Namespace) -> dict:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        jobs = jobs_pb2_grpc.JobsStub(ch)
        live = tts_pb2_grpc.TextToSpeechStub(ch)
        await stream(live, request(4, 0), {})  # the first call's set-up is not the point
        alone = await live_streams(live, args, 200)
        names = []
        for i in range(JOBS):
            created = await jobs.CreateJob(
                jobs_pb2.CreateJobRequest(request=request(args.job_frames, 100 + i)), metadata=OWNER
            )
            names.append(created.job.name)
        # The jobs start one after the other, each once the llm reports the last one's stream.
        deadline = time.monotonic() + 600
        while not all(j.frames_done > 0 for j in await job_states(jobs, names)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the jobs did not start: {await job_states(jobs, names)}")
            await asyncio.sleep(0.2)
        before = await job_states(jobs, names)

        with_jobs = await live_streams(live, args, 300)
        after = await job_states(jobs, names)
        for name in names:
            await jobs.CancelJob(jobs_pb2.CancelJobRequest(name=name), metadata=OWNER)
    return {
        "jobs": JOBS,
        "job_frames": args.job_frames,
        "live_streams": args.live,
        "live_frames": args.live_frames,
        "frame_ms": FRAME_MS,
        "live_with_jobs": with_jobs,
        "live_alone": alone,  # the same streams with no job running: what the device gives them anyway
        "gaps_within_a_frame": with_jobs["max_gap_between_chunks_ms"] <= FRAME_MS,
        # Frames the jobs made while the live streams ran, and the times they gave their rows up to them.
        "job_frames_during_live": sum(a.frames_done - b.frames_done for a, b in zip(after, before, strict=True)),
        "job_pauses": sum(j.pauses for j in after),
    }


class Watcher(threading.Thread):
    """Follows a job with WatchJob from its first frame, as a client would: after a broken stream it asks again
    from the frame after the last it has. It keeps a hash of the audio in order, to hold against the file."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(daemon=True)
        self.address, self.name = address, name
        self.audio = hashlib.sha256()
        self.bytes = 0
        self.next_frame = 0
        self.reconnects = 0
        self.error: str | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as ch:
            stub = jobs_pb2_grpc.JobsStub(ch)
            while True:
                request = jobs_pb2.WatchJobRequest(name=self.name, from_frame=self.next_frame)
                try:
                    for r in stub.WatchJob(request, metadata=OWNER):
                        if r.WhichOneof("event") == "audio":
                            if r.audio.frame_index != self.next_frame:
                                self.error = f"frame {r.audio.frame_index} came where {self.next_frame} was due"
                                return
                            self.audio.update(r.audio.data)
                            self.bytes += len(r.audio.data)
                            self.next_frame += 1
                    return
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        self.error = f"{e.code().name}: {e.details()}"
                        return
                    self.reconnects += 1
                    time.sleep(0.5)


def resume_after_kill(mesh: Mesh, args: argparse.Namespace) -> dict:
    """One long job through Envoy, the llm killed (SIGKILL) at a checkpoint of `--kill-at` frames and started
    again: the job's wall time, each GPU service's peak memory, how long the job took to go on, the frames lost,
    and whether the file equals the audio a client watching from the start received."""
    address = f"127.0.0.1:{mesh.ports.envoy}"
    stub = jobs_pb2_grpc.JobsStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))

    def job(name: str) -> jobs_pb2.Job:
        return stub.GetJob(jobs_pb2.GetJobRequest(name=name), metadata=OWNER, timeout=30).job

    def wait(name: str, done, what: str, timeout_s: float = 7200) -> jobs_pb2.Job:
        deadline = time.monotonic() + timeout_s
        said = time.monotonic()
        while not done(current := job(name)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {current}")
            if time.monotonic() - said > 30:
                print(f"  {current.frames_done} frames done, {current.frames_checkpointed} checkpointed", flush=True)
                said = time.monotonic()
            time.sleep(0.05)
        return current

    def pids() -> dict[int, str]:
        # A copy: the main thread replaces the llm's process while the sampler's thread reads this.
        return {p.pid: name for name, p in list(mesh.processes.items()) if name in ("llm", "acoustic")}

    with GpuMemorySampler(pids) as memory:
        created = time.monotonic()
        name = stub.CreateJob(jobs_pb2.CreateJobRequest(request=request(args.job_frames, 7)), metadata=OWNER).job.name
        watcher = Watcher(address, name)
        watcher.start()
        wait(name, lambda j: j.frames_checkpointed >= args.kill_at, f"no checkpoint of {args.kill_at} frames")
        resumes = job(name).resumes
        killed = time.monotonic()
        mesh.stop_service("llm", sig=signal.SIGKILL)
        # Once the jobs service has seen the llm go, it has checkpointed every frame it holds and queued the job.
        checkpoint = wait(name, lambda j: j.resumes > resumes, "the job was not queued to resume").frames_checkpointed
        mesh.start_service("llm")
        mesh.wait_ready(600, ["llm"])
        llm_ready = time.monotonic()
        wait(name, lambda j: j.frames_done > checkpoint, "the job did not go on")
        going_on = time.monotonic()
        done = wait(name, lambda j: j.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED), "not done")
        finished = time.monotonic()
    watcher.join(120)
    parts = list(stub.GetJobAudio(jobs_pb2.GetJobAudioRequest(name=name), metadata=OWNER, timeout=600))
    stored = b"".join(p.data for p in parts)
    frame_bytes = SAMPLES_PER_FRAME * 2  # PCM16
    watched = watcher.audio.digest()
    wall_s = finished - created
    audio_s = done.frames_done * FRAME_MS / 1000
    return {
        "job_frames": args.job_frames,
        "state": jobs_pb2.JobState.Name(done.state),
        "wall_s": wall_s,
        "real_time_factor": wall_s / audio_s,
        # Without the llm's outage: from the kill until the job made a frame past the checkpoint.
        "wall_s_without_outage": wall_s - (going_on - killed),
        "real_time_factor_without_outage": (wall_s - (going_on - killed)) / audio_s,
        **memory.report(),
        "killed_at_checkpoint": checkpoint,
        "llm_start_s": llm_ready - killed,  # the llm process's own start-up: weights, KV pool, graphs
        "resume_s": going_on - llm_ready,  # from a ready llm to the first frame after the checkpoint
        "resumed_by": "rebuild" if done.rebuilds else "making the segment again",
        "rebuilds": done.rebuilds,
        "frames_regenerated": done.frames_regenerated,
        "frames_in_file": len(stored) // frame_bytes,
        "frames_lost": args.job_frames - len(stored) // frame_bytes,
        "watched_frames": watcher.next_frame,
        "watch_reconnects": watcher.reconnects,
        "watch_error": watcher.error,
        "file_equals_watched_audio": watcher.error is None and hashlib.sha256(stored).digest() == watched,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-streams", type=int, default=64, help="the llm's batch rows (small: jobs get paused)")
    p.add_argument("--job-frames", type=int, default=None, help="each job's fixed frames (default: by device)")
    p.add_argument("--live", type=int, default=8, help="live streams while the jobs run")
    p.add_argument("--live-frames", type=int, default=100)
    p.add_argument("--arrival-s", type=float, default=0.25, help="seconds between live arrivals")
    p.add_argument("--kill-at", type=int, default=0, help="measure a resume: kill the llm at this checkpoint")
    args = p.parse_args()
    # Long enough to outlast the live streams: a CPU makes a few tens of tiny-model frames a second.
    args.job_frames = args.job_frames or (1500 if args.device == "cuda" else 3000)
    path = common.checkpoint(args.shape)
    mesh = Mesh(  # its job store: a temporary directory, removed when the mesh stops
        ports=Ports.free(),
        model=str(path),
        device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        allow_fixed_frames=True,
        max_streams=args.max_streams,
        llm_args=["--max-context", "4096"],
        log_dir=Path(common.out_dir()) / "logs-jobs",
    )
    if args.kill_at:
        mesh.llm_args = []  # the model's own context: a long job must fit
        with mesh:
            result = resume_after_kill(mesh, args)
        result.update(shape=args.shape, device=args.device)
        print(
            f"{result['job_frames']} frames in {result['wall_s']:.0f} s (real-time factor "
            f"{result['real_time_factor']:.3f}; {result['real_time_factor_without_outage']:.3f} without the llm's "
            f"outage); peak GiB {result['peak_gib_by_service']} (whole GPU {result['peak_gib_whole_gpu']}); llm killed "
            f"at checkpoint {result['killed_at_checkpoint']}: the job went on {result['resume_s']:.1f} s after the llm "
            f"was ready ({result['llm_start_s']:.1f} s to start), by {result['resumed_by']}; "
            f"{result['frames_regenerated']} frames made again, {result['frames_lost']} lost; file equals the watched "
            f"audio: {result['file_equals_watched_audio']}",
            flush=True,
        )
        common.save(f"jobs-resume-{args.shape}", result)
        return
    with mesh:
        result = asyncio.run(run(f"127.0.0.1:{mesh.ports.envoy}", args))
    result.update(shape=args.shape, device=args.device, max_streams=args.max_streams)
    with_jobs, alone = result["live_with_jobs"], result["live_alone"]
    verdict = "within" if result["gaps_within_a_frame"] else "OVER"
    print(
        f"largest gap between live chunks with {JOBS} jobs running: {with_jobs['max_gap_between_chunks_ms']:.1f} ms, "
        f"{verdict} the {FRAME_MS:.1f} ms frame (p99 {with_jobs['p99_gap_between_chunks_ms']:.1f} ms; with no job "
        f"{alone['max_gap_between_chunks_ms']:.1f} ms); the jobs made {result['job_frames_during_live']} frames "
        f"meanwhile and paused {result['job_pauses']} times",
        flush=True,
    )
    common.save(f"jobs-{args.shape}", result)


if __name__ == "__main__":
    main()

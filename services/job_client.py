"""`vvmesh job`: long-form jobs from the command line, through Envoy.

vvmesh job submit SCRIPT --voice 1=a.wav [--job-id ID] [--format flac]   queue a job; prints its name
vvmesh job status NAME                                                    state, progress, time left, error
vvmesh job watch NAME -o OUT                                              the audio as it is made, with a progress bar
vvmesh job list                                                           your jobs, newest first
vvmesh job cancel NAME
vvmesh job download NAME -o OUT                                           the finished file (format from OUT's suffix)

`watch` keeps a small sidecar file next to OUT (OUT.watch) saying how many frames and bytes it has written;
run after Ctrl-C, the same command goes on from the next frame. When the job has succeeded the file gets its
real sizes (as `vvmesh synth` writes it) and the sidecar is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.rpc import code_pb2
from tqdm import tqdm
from vibevoice.tts.v1 import jobs_pb2, jobs_pb2_grpc, tts_pb2

from services.cli import CliError, _Parser, _voices, fixed_frames
from services.client import FORMAT_BY_SUFFIX, FORMAT_NAMES, build_request
from services.common.audio_files import finalize
from services.common.grpc_server import CHANNEL_OPTIONS
from services.mesh import BASE_PORT

CALL_TIMEOUT_S = 60.0
STATE_NAMES = {v: k.removeprefix("JOB_STATE_").lower() for k, v in jobs_pb2.JobState.items()}


def job_name(name: str) -> str:
    return name if name.startswith("jobs/") else f"jobs/{name}"


class Client:
    def __init__(self, address: str, api_key: str | None) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = jobs_pb2_grpc.JobsStub(self.channel)
        self.metadata = [("x-api-key", api_key)] if api_key else None

    def unary(self, method: str, request, timeout: float = CALL_TIMEOUT_S):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)

    def stream(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


def describe(job: jobs_pb2.Job) -> str:
    state = STATE_NAMES[job.state]
    line = f"{job.name}: {state}, {job.frames_done} of about {job.estimated_frames} frames"
    line += f" ({job.progress_percent:.1f}%), {job.audio_seconds:.1f} s of audio"
    if job.HasField("estimated_time_left"):
        line += f", about {job.estimated_time_left.ToTimedelta().total_seconds():.0f} s left"
    if job.finish_reason:
        line += f", ended by {job.finish_reason}"
    if job.resumes:
        line += f", resumed {job.resumes}x"
    if job.HasField("error"):
        line += f"; error {code_pb2.Code.Name(job.error.code)}: {job.error.message}"
    return line


def _submit(client: Client, args: argparse.Namespace) -> int:
    script = Path(args.script).read_text()
    request = build_request(
        script,
        _voices(args.voice),
        FORMAT_BY_SUFFIX[f".{args.format}"],
        cfg_scale=args.cfg_scale,
        diffusion_steps=args.steps,
        seed=args.seed,
        max_audio_seconds=args.max_audio_seconds,
        fixed_frames=fixed_frames(script, args.fixed_frames),
    )
    job = client.unary("CreateJob", jobs_pb2.CreateJobRequest(job_id=args.job_id or "", request=request)).job
    print(describe(job))
    return 0


def _status(client: Client, args: argparse.Namespace) -> int:
    print(describe(client.unary("GetJob", jobs_pb2.GetJobRequest(name=job_name(args.name))).job))
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    token = ""
    while True:
        page = client.unary("ListJobs", jobs_pb2.ListJobsRequest(page_size=args.page_size, page_token=token))
        for job in page.jobs:
            print(describe(job))
        token = page.next_page_token
        if not token:
            return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    print(describe(client.unary("CancelJob", jobs_pb2.CancelJobRequest(name=job_name(args.name))).job))
    return 0


class Sidecar:
    """OUT.watch: the job, and the frames and bytes of OUT written so far (only whole chunks)."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".watch")

    def load(self, name: str) -> tuple[int, int]:
        """(next frame, bytes) to go on from; (0, 0) without a sidecar for this job."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0, 0
        if state.get("name") != name:
            return 0, 0
        return int(state["next_frame"]), int(state["bytes"])

    def save(self, name: str, next_frame: int, nbytes: int) -> None:
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_text(json.dumps({"name": name, "next_frame": next_frame, "bytes": nbytes}))
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _watch(client: Client, args: argparse.Namespace) -> int:
    name, out = job_name(args.name), Path(args.output)
    sidecar = Sidecar(out)
    next_frame, nbytes = sidecar.load(name) if out.exists() else (0, 0)
    job = client.unary("GetJob", jobs_pb2.GetJobRequest(name=name)).job
    out.parent.mkdir(parents=True, exist_ok=True)
    header, summary = None, None
    bar = tqdm(total=job.estimated_frames, initial=next_frame, unit=" frames", desc="watching", disable=None)
    try:
        with open(out, "r+b" if nbytes else "wb") as f:
            f.truncate(nbytes)  # anything after the last whole chunk is written again
            f.seek(nbytes)
            for response in client.stream("WatchJob", jobs_pb2.WatchJobRequest(name=name, from_frame=next_frame)):
                kind = response.WhichOneof("event")
                if kind == "header":
                    header = response.header
                elif kind == "audio" and response.audio.data:
                    f.write(response.audio.data)
                    f.flush()
                    # The container's trailing bytes repeat the last frame's index: not a place to go on from.
                    if response.audio.frame_index >= next_frame:
                        next_frame = response.audio.frame_index + 1
                        bar.update(max(0, next_frame - bar.n))
                        sidecar.save(name, next_frame, f.tell())
                elif kind == "summary":
                    summary = response.summary
    except KeyboardInterrupt:
        # Ctrl-C may land between a chunk's write and the sidecar's update: leave the file as the sidecar says.
        kept_frame, kept_bytes = sidecar.load(name)
        os.truncate(out, kept_bytes)
        bar.close()
        print(f"stopped at frame {kept_frame}; the same command goes on from there")
        raise
    finally:
        bar.close()
    if summary is None:
        raise CliError(f"the stream of {name} ended without its summary; run the command again")
    fmt = FORMAT_NAMES.get(header.format if header else 0, "wav")
    partial = out.with_name(out.name + ".part")
    partial.write_bytes(finalize(out.read_bytes(), fmt))
    partial.replace(out)
    sidecar.remove()
    print(f"wrote {out}: {summary.audio_seconds:.2f} s of audio ({summary.frames} frames, {summary.finish_reason})")
    return 0


def _download(client: Client, args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = FORMAT_BY_SUFFIX.get(out.suffix.lower(), tts_pb2.AUDIO_FORMAT_UNSPECIFIED)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    total = None
    with open(partial, "wb") as f:
        for response in client.stream("GetJobAudio", jobs_pb2.GetJobAudioRequest(name=job_name(args.name), format=fmt)):
            total = response.total_bytes if total is None else total
            f.write(response.data)
        written = f.tell()
    if total is None or written != total:
        os.unlink(partial)
        raise CliError(f"the download ended after {written} of {total} bytes")
    partial.replace(out)
    print(f"wrote {out}: {written} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vvmesh job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=f"127.0.0.1:{BASE_PORT}")
    common.add_argument("--api-key", default=None, help="whose jobs (the x-api-key)")
    sub = p.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", parents=[common], help="queue a job")
    submit.add_argument("script")
    submit.add_argument("--voice", action="append", default=[], metavar="SPEAKER=FILE")
    submit.add_argument("--job-id", default=None, help="your id for the job: submitting it again is safe")
    submit.add_argument("--format", default="wav", choices=[s.lstrip(".") for s in FORMAT_BY_SUFFIX])
    submit.add_argument("--cfg-scale", type=float, default=None)
    submit.add_argument("--steps", type=int, default=None)
    submit.add_argument("--seed", type=int, default=None)
    submit.add_argument("--max-audio-seconds", type=float, default=None)
    submit.add_argument("--fixed-frames", default=None, help="N, or 'auto' (servers started with --allow-fixed-frames)")

    for command, text in (("status", "a job's state and progress"), ("cancel", "stop a job")):
        sub.add_parser(command, parents=[common], help=text).add_argument("name", help="jobs/ID or ID")
    watch = sub.add_parser("watch", parents=[common], help="write a job's audio as it is made (resumes after Ctrl-C)")
    watch.add_argument("name", help="jobs/ID or ID")
    watch.add_argument("-o", "--output", required=True)
    download = sub.add_parser("download", parents=[common], help="a succeeded job's audio as one file")
    download.add_argument("name", help="jobs/ID or ID")
    download.add_argument("-o", "--output", required=True, help="its suffix picks the format (else the job's)")
    listing = sub.add_parser("list", parents=[common], help="your jobs, newest first")
    listing.add_argument("--page-size", type=int, default=50)
    return p


COMMANDS = {
    "submit": _submit,
    "status": _status,
    "list": _list,
    "cancel": _cancel,
    "watch": _watch,
    "download": _download,
}


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        client = Client(args.address, args.api_key)
        try:
            return COMMANDS[args.command](client, args)
        finally:
            client.close()
    except Exception as e:
        # The CLI's own errors (CliError, UsageError) as one line. Matched by their exit_code: run as
        # `python -m services.cli`, the module raising them here is a second copy of services.cli.
        if not hasattr(e, "exit_code"):
            raise
        print(" ".join(f"error: {e}".split()), file=sys.stderr)
        return e.exit_code

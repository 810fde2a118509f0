"""The Jobs API: long-form synthesis as durable jobs, run on the mesh's spare capacity (`vvmesh serve jobs`).

Requests are checked as the gateway checks Synthesize (INVALID_ARGUMENT naming the field, here under
`request.` for the SynthesizeRequest inside CreateJob); the script is parsed when the job is created, so a
job that is accepted has a prompt that fits. Jobs run in services/jobs/runner.py (whose docstring says how
they resume) and are stored by services/jobs/store.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import logging
import tempfile
import uuid
from pathlib import Path

from google.rpc import code_pb2, error_details_pb2, status_pb2
from vibevoice.tts.v1 import jobs_pb2, jobs_pb2_grpc

from services.common.audio import MEDIA_TYPES
from services.common.errors import RequestError, abort, invalid_argument, status_error
from services.common.grpc_server import Service
from services.common.logs import escape, setup_logging
from services.common.telemetry import setup_tracing
from services.jobs import store as states
from services.jobs.export import export
from services.jobs.resource import check_job_id, job, job_id_of
from services.jobs.runner import Runner
from services.jobs.store import JobRecord, Store, StoreFull, request_hash
from services.jobs.watch import watch
from services.mesh import DEFAULT_JOBS_DATA_DIR, JobsConfig, Ports
from services.synthesis.backends import Backends, api_key, decode_voices
from services.synthesis.estimates import estimated_frames
from services.synthesis.options import FORMATS, MAX_REQUEST_ID_CHARS, check_options

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
AUDIO_CHUNK_BYTES = 1 << 20


def _within(error: RequestError, prefix: str) -> RequestError:
    """The same error with its field names under `prefix` (the SynthesizeRequest is CreateJob's `request`)."""
    status = status_pb2.Status()
    status.CopyFrom(error.status)
    if status.code != code_pb2.INVALID_ARGUMENT:
        return RequestError(status)
    status.message = prefix + status.message
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                violation.field = prefix + violation.field
            detail.Pack(bad)
    return RequestError(status)


def _page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _before_seq(token: str) -> int | None:
    if not token:
        return None
    try:
        kind, _, seq = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "seq" and seq.isdigit():
            return int(seq)
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise invalid_argument("page_token", "not a token from a previous ListJobs response")


class Jobs(jobs_pb2_grpc.JobsServicer):
    def __init__(self, store: Store, backends: Backends, runner: Runner) -> None:
        self.store = store
        self.backends = backends
        self.runner = runner

    def _owned(self, name: str, owner: str) -> JobRecord:
        job_id = job_id_of(name)
        record = self.store.get(job_id)
        if record is None or record.owner != owner:  # another key's job is as good as absent
            raise status_error(code_pb2.NOT_FOUND, f"{name} does not exist")
        return record

    def _job(self, record: JobRecord) -> jobs_pb2.Job:
        return job(record, self.runner.runs.get(record.job_id), self.runner.segments)

    async def _answer(self, context, handler, *args):
        """Runs a unary handler; its RequestError becomes the call's status (after the except block, so the
        traceback does not keep the request, voices and all, alive)."""
        try:
            return await handler(*args)
        except RequestError as e:
            refused = RequestError(e.status)
        await abort(context, refused)

    # ---- create

    async def CreateJob(self, request, context):  # noqa: N802
        return await self._answer(context, self._create, request, api_key(context), context.time_remaining())

    def _existing(self, record: JobRecord, owner: str, digest: str) -> jobs_pb2.CreateJobResponse:
        if record.owner != owner or record.request_hash != digest:
            raise status_error(
                code_pb2.ALREADY_EXISTS, f"jobs/{record.job_id} exists and was created with another request"
            )
        return jobs_pb2.CreateJobResponse(job=self._job(record))

    async def _create(self, request, owner: str, time_remaining: float | None) -> jobs_pb2.CreateJobResponse:
        if not request.HasField("request"):
            raise invalid_argument("request", "required: the SynthesizeRequest the job runs")
        job_id = check_job_id(request.job_id) if request.job_id else uuid.uuid4().hex
        serialized = request.request.SerializeToString(deterministic=True)
        digest = request_hash(serialized)
        if (record := self.store.get(job_id)) is not None:  # a retry
            return self._existing(record, owner, digest)
        synthesize = request.request
        try:
            options = check_options(synthesize)
            voices = await asyncio.to_thread(decode_voices, synthesize)
            request_id = synthesize.request_id or job_id
            prepared = await self.backends.prepare(synthesize, options, request_id, voices, time_remaining)
        except RequestError as e:
            raise _within(e, "request.") from None
        # No await from here to the insert: a retry racing this call finds the record or finds nothing.
        if (record := self.store.get(job_id)) is not None:
            return self._existing(record, owner, digest)
        try:
            self.store.write_request(job_id, serialized)
        except StoreFull as e:
            raise status_error(code_pb2.RESOURCE_EXHAUSTED, str(e)) from None
        record = self.store.insert(
            job_id=job_id,
            owner=owner,
            request_hash=digest,
            request_id=request_id,
            format=options.format,
            seed=options.seed,
            estimated_frames=min(estimated_frames(synthesize), prepared.max_frames),
            header=prepared.header.SerializeToString(),
        )
        self.runner.segments.plan(job_id, prepared.segments)
        log.info("job %s: created (request %s)", job_id, escape(request_id, max_chars=MAX_REQUEST_ID_CHARS))
        self.runner.wake.set()
        return jobs_pb2.CreateJobResponse(job=self._job(record))

    # ---- read

    async def GetJob(self, request, context):  # noqa: N802
        async def get() -> jobs_pb2.GetJobResponse:
            return jobs_pb2.GetJobResponse(job=self._job(self._owned(request.name, api_key(context))))

        return await self._answer(context, get)

    async def ListJobs(self, request, context):  # noqa: N802
        async def page() -> jobs_pb2.ListJobsResponse:
            if request.page_size < 0:
                raise invalid_argument("page_size", f"{request.page_size} must not be negative")
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            records = self.store.page(api_key(context), size + 1, _before_seq(request.page_token))
            more = len(records) > size
            records = records[:size]
            return jobs_pb2.ListJobsResponse(
                jobs=[self._job(r) for r in records], next_page_token=_page_token(records[-1].seq) if more else ""
            )

        return await self._answer(context, page)

    # ---- change

    async def CancelJob(self, request, context):  # noqa: N802
        async def cancel() -> jobs_pb2.CancelJobResponse:
            record = self._owned(request.name, api_key(context))
            if record.state in (states.SUCCEEDED, states.FAILED):
                raise status_error(code_pb2.FAILED_PRECONDITION, f"{request.name} has already {record.state}")
            if record.state in states.ACTIVE:
                await self.runner.cancel(record.job_id)
                log.info("job %s: cancelled", record.job_id)
            return jobs_pb2.CancelJobResponse(job=self._job(self.store.get(record.job_id)))

        return await self._answer(context, cancel)

    async def DeleteJob(self, request, context):  # noqa: N802
        async def delete() -> jobs_pb2.DeleteJobResponse:
            record = self._owned(request.name, api_key(context))
            if record.state in states.ACTIVE:
                await self.runner.cancel(record.job_id)
            self.store.delete(record.job_id)
            self.runner.changed(record.job_id)
            log.info("job %s: deleted", record.job_id)
            return jobs_pb2.DeleteJobResponse()

        return await self._answer(context, delete)

    # ---- streams

    async def WatchJob(self, request, context):  # noqa: N802
        refused = None
        try:
            record = self._owned(request.name, api_key(context))
            async for response in watch(self.runner, record.job_id, request.from_frame):
                yield response
        except RequestError as e:
            refused = RequestError(e.status)
        if refused is not None:
            await abort(context, refused)

    async def GetJobAudio(self, request, context):  # noqa: N802
        refused = None
        try:
            if request.format not in FORMATS:
                raise invalid_argument(
                    "format", f"unknown output format {request.format}; use PCM16, PCM_F32, WAV, FLAC or OGG_OPUS"
                )
            record = self._owned(request.name, api_key(context))
            fmt = request.format or record.format
            if record.state != states.SUCCEEDED:
                raise status_error(
                    code_pb2.FAILED_PRECONDITION,
                    f"{request.name} is {record.state}: its file is made once it has succeeded (WatchJob streams it "
                    "meanwhile)",
                )
            encoder = FORMATS[fmt]
            # An unnamed file in the job's directory: gone when closed, or when the job is deleted meanwhile.
            with tempfile.TemporaryFile(dir=self.store.job_dir(record.job_id)) as out:
                try:
                    await asyncio.to_thread(
                        export, self.store.frames_path(record.job_id), record.frames_done, encoder, out
                    )
                except OSError as e:
                    raise status_error(code_pb2.RESOURCE_EXHAUSTED, f"the file cannot be made: {e.strerror}") from None
                total = out.seek(0, io.SEEK_END)  # libFLAC last wrote STREAMINFO, at the start
                out.seek(0)
                first = jobs_pb2.GetJobAudioResponse(media_type=MEDIA_TYPES[encoder], total_bytes=total)
                while data := out.read(AUDIO_CHUNK_BYTES):
                    first.data = data
                    yield first
                    first = jobs_pb2.GetJobAudioResponse()
                if total == 0:
                    yield first
        except RequestError as e:
            refused = RequestError(e.status)
        if refused is not None:
            await abort(context, refused)


def parser() -> argparse.ArgumentParser:
    defaults, ports = JobsConfig(), Ports()
    p = argparse.ArgumentParser(prog="vvmesh serve jobs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=ports.jobs)
    p.add_argument("--text-parser", default=f"127.0.0.1:{ports.text_parser}")
    p.add_argument("--acoustic", default=f"127.0.0.1:{ports.acoustic}")
    p.add_argument("--llm", default=f"127.0.0.1:{ports.llm}")
    p.add_argument(
        "--data-dir", default=defaults.data_dir or DEFAULT_JOBS_DATA_DIR, help="the job store: records and audio"
    )
    p.add_argument(
        "--max-data-bytes",
        type=int,
        default=defaults.max_data_bytes,
        help="bytes the jobs' files may take in all; a job that would pass it fails (0: only the disk's limit)",
    )
    p.add_argument("--max-running", type=int, default=defaults.max_running, help="jobs running at once, at most")
    p.add_argument(
        "--reserve-fraction",
        type=float,
        default=defaults.reserve_fraction,
        help="share of the llm's streams and KV pool a job leaves free for live calls (services/jobs/spare.py)",
    )
    p.add_argument(
        "--drain-grace",
        type=float,
        default=defaults.drain_grace,
        help="seconds open calls get after SIGTERM; running jobs checkpoint and resume at the next start",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging("jobs")
    setup_tracing("jobs")

    async def run() -> None:
        store = Store(Path(args.data_dir), args.max_data_bytes)
        runner = Runner(
            store,
            Backends(args.text_parser, args.acoustic, args.llm, frame_states=True),
            args.max_running,
            args.reserve_fraction,
        )
        runner.recover()
        service = Service("jobs", args.host, args.port, [jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name])
        jobs_pb2_grpc.add_JobsServicer_to_server(Jobs(store, runner.backends, runner), service.server)
        schedule = asyncio.create_task(runner.schedule())
        await service.run(grace_s=args.drain_grace, on_drain=lambda: setattr(runner, "max_running", 0))
        schedule.cancel()
        await runner.stop()
        store.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()

"""A job record as the API's Job resource, with what only the running process knows (live frames, time left)."""

from __future__ import annotations

import re

from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import status_pb2
from vibevoice.tts.v1 import jobs_pb2

from services.common.errors import invalid_argument
from services.common.frames import FRAMES_PER_SECOND
from services.jobs import store as states
from services.jobs.runner import Run
from services.jobs.segments import JobSegments
from services.jobs.store import JobRecord

# A job id: the last part of `jobs/{job_id}`, as the API design guide has resource ids.
JOB_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
JOB_ID_RULE = "1 to 63 lowercase letters, digits and hyphens, not starting or ending with a hyphen"
STATES = {
    states.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    states.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    states.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    states.FAILED: jobs_pb2.JOB_STATE_FAILED,
    states.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}


def check_job_id(job_id: str, field: str = "job_id") -> str:
    if not JOB_ID.match(job_id):
        raise invalid_argument(field, f"{job_id[:80]!r} is not a job id: {JOB_ID_RULE}")
    return job_id


def job_id_of(name: str, field: str = "name") -> str:
    """The id in a job's name, `jobs/{job_id}`."""
    prefix, _, job_id = name.partition("/")
    if prefix != "jobs" or not job_id:
        raise invalid_argument(field, f"{name[:80]!r} is not a job name; expected jobs/{{job_id}}")
    return check_job_id(job_id, field)


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def progress_percent(frames: int, record: JobRecord) -> float:
    if record.state == states.SUCCEEDED:
        return 100.0
    if record.estimated_frames <= 0:
        return 0.0
    return min(99.9, 100.0 * frames / record.estimated_frames)


def job(record: JobRecord, run: Run | None, segments: JobSegments) -> jobs_pb2.Job:
    frames = run.frames if run is not None else record.frames_done
    segments = segments.listed(record.job_id, frames)
    out = jobs_pb2.Job(
        name=f"jobs/{record.job_id}",
        owner=record.owner,
        state=STATES[record.state],
        request_id=record.request_id,
        format=record.format,
        seed=record.seed,
        frames_done=frames,
        frames_checkpointed=record.frames_done,
        estimated_frames=record.estimated_frames,
        progress_percent=progress_percent(frames, record),
        create_time=_timestamp(record.create_time),
        start_time=_timestamp(record.start_time),
        end_time=_timestamp(record.end_time),
        segments=segments,
        finish_reason=record.finish_reason,
        audio_seconds=frames / FRAMES_PER_SECOND,
        resumes=record.resumes,
        pauses=record.pauses,
        rebuilds=record.rebuilds,
        frames_regenerated=record.frames_regenerated,
    )
    left = run.seconds_left(record.estimated_frames) if run is not None and record.state == states.RUNNING else None
    if left is not None:
        out.estimated_time_left.CopyFrom(duration_pb2.Duration(seconds=int(left), nanos=int(left % 1 * 1e9)))
    if record.error:
        out.error.CopyFrom(status_pb2.Status.FromString(record.error))
    if record.checks:
        out.audio_checks.CopyFrom(jobs_pb2.AudioChecks.FromString(record.checks))
    return out

import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from vibevoice.tts.v1 import tts_pb2 as _tts_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class Job(_message.Message):
    __slots__ = ("name", "owner", "state", "request_id", "format", "seed", "frames_done", "frames_checkpointed", "estimated_frames", "progress_percent", "estimated_time_left", "create_time", "start_time", "end_time", "segments", "error", "audio_checks", "finish_reason", "audio_seconds", "resumes", "pauses", "rebuilds", "frames_regenerated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_CHECKPOINTED_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TIME_LEFT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHECKS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    REBUILDS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REGENERATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner: str
    state: JobState
    request_id: str
    format: _tts_pb2.AudioFormat
    seed: int
    frames_done: int
    frames_checkpointed: int
    estimated_frames: int
    progress_percent: float
    estimated_time_left: _duration_pb2.Duration
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    segments: _containers.RepeatedCompositeFieldContainer[JobSegment]
    error: _status_pb2.Status
    audio_checks: AudioChecks
    finish_reason: str
    audio_seconds: float
    resumes: int
    pauses: int
    rebuilds: int
    frames_regenerated: int
    def __init__(self, name: _Optional[str] = ..., owner: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request_id: _Optional[str] = ..., format: _Optional[_Union[_tts_pb2.AudioFormat, str]] = ..., seed: _Optional[int] = ..., frames_done: _Optional[int] = ..., frames_checkpointed: _Optional[int] = ..., estimated_frames: _Optional[int] = ..., progress_percent: _Optional[float] = ..., estimated_time_left: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[JobSegment, _Mapping]]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., audio_checks: _Optional[_Union[AudioChecks, _Mapping]] = ..., finish_reason: _Optional[str] = ..., audio_seconds: _Optional[float] = ..., resumes: _Optional[int] = ..., pauses: _Optional[int] = ..., rebuilds: _Optional[int] = ..., frames_regenerated: _Optional[int] = ...) -> None: ...

class JobSegment(_message.Message):
    __slots__ = ("index", "first_turn", "turns", "prompt_tokens", "first_frame", "frames")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_TURN_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    index: int
    first_turn: int
    turns: int
    prompt_tokens: int
    first_frame: int
    frames: int
    def __init__(self, index: _Optional[int] = ..., first_turn: _Optional[int] = ..., turns: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., first_frame: _Optional[int] = ..., frames: _Optional[int] = ...) -> None: ...

class AudioChecks(_message.Message):
    __slots__ = ("longest_silence_seconds", "clipped_samples", "integrated_loudness_lufs", "gap_over_one_second", "longest_gap_seconds", "gap_at_seconds")
    LONGEST_SILENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_LOUDNESS_LUFS_FIELD_NUMBER: _ClassVar[int]
    GAP_OVER_ONE_SECOND_FIELD_NUMBER: _ClassVar[int]
    LONGEST_GAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GAP_AT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    longest_silence_seconds: float
    clipped_samples: int
    integrated_loudness_lufs: float
    gap_over_one_second: bool
    longest_gap_seconds: float
    gap_at_seconds: float
    def __init__(self, longest_silence_seconds: _Optional[float] = ..., clipped_samples: _Optional[int] = ..., integrated_loudness_lufs: _Optional[float] = ..., gap_over_one_second: _Optional[bool] = ..., longest_gap_seconds: _Optional[float] = ..., gap_at_seconds: _Optional[float] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job_id", "request")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request: _tts_pb2.SynthesizeRequest
    def __init__(self, job_id: _Optional[str] = ..., request: _Optional[_Union[_tts_pb2.SynthesizeRequest, _Mapping]] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name", "from_frame")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FROM_FRAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    from_frame: int
    def __init__(self, name: _Optional[str] = ..., from_frame: _Optional[int] = ...) -> None: ...

class GetJobAudioRequest(_message.Message):
    __slots__ = ("name", "format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: _tts_pb2.AudioFormat
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[_tts_pb2.AudioFormat, str]] = ...) -> None: ...

class GetJobAudioResponse(_message.Message):
    __slots__ = ("data", "media_type", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

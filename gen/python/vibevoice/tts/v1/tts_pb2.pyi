from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_FORMAT_UNSPECIFIED: _ClassVar[AudioFormat]
    AUDIO_FORMAT_PCM16: _ClassVar[AudioFormat]
    AUDIO_FORMAT_WAV: _ClassVar[AudioFormat]
    AUDIO_FORMAT_FLAC: _ClassVar[AudioFormat]
    AUDIO_FORMAT_OGG_OPUS: _ClassVar[AudioFormat]
    AUDIO_FORMAT_PCM_F32: _ClassVar[AudioFormat]
AUDIO_FORMAT_UNSPECIFIED: AudioFormat
AUDIO_FORMAT_PCM16: AudioFormat
AUDIO_FORMAT_WAV: AudioFormat
AUDIO_FORMAT_FLAC: AudioFormat
AUDIO_FORMAT_OGG_OPUS: AudioFormat
AUDIO_FORMAT_PCM_F32: AudioFormat

class SynthesizeRequest(_message.Message):
    __slots__ = ("request_id", "text", "turns", "voices", "format", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    turns: Script
    voices: _containers.RepeatedCompositeFieldContainer[VoicePrompt]
    format: AudioFormat
    options: GenerationOptions
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., turns: _Optional[_Union[Script, _Mapping]] = ..., voices: _Optional[_Iterable[_Union[VoicePrompt, _Mapping]]] = ..., format: _Optional[_Union[AudioFormat, str]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ...) -> None: ...

class Script(_message.Message):
    __slots__ = ("turns",)
    TURNS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("speaker", "text")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    speaker: int
    text: str
    def __init__(self, speaker: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class VoicePrompt(_message.Message):
    __slots__ = ("speaker", "audio")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    speaker: int
    audio: bytes
    def __init__(self, speaker: _Optional[int] = ..., audio: _Optional[bytes] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("cfg_scale", "diffusion_steps", "seed", "max_audio_seconds", "fixed_frames")
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    cfg_scale: float
    diffusion_steps: int
    seed: int
    max_audio_seconds: float
    fixed_frames: int
    def __init__(self, cfg_scale: _Optional[float] = ..., diffusion_steps: _Optional[int] = ..., seed: _Optional[int] = ..., max_audio_seconds: _Optional[float] = ..., fixed_frames: _Optional[int] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("header", "audio", "progress", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    audio: AudioChunk
    progress: Progress
    summary: Summary
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("request_id", "sample_rate", "format", "media_type", "speakers", "warnings", "model", "random_weights", "seed", "prompt_tokens", "max_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sample_rate: int
    format: AudioFormat
    media_type: str
    speakers: _containers.RepeatedCompositeFieldContainer[Speaker]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    model: str
    random_weights: bool
    seed: int
    prompt_tokens: int
    max_frames: int
    def __init__(self, request_id: _Optional[str] = ..., sample_rate: _Optional[int] = ..., format: _Optional[_Union[AudioFormat, str]] = ..., media_type: _Optional[str] = ..., speakers: _Optional[_Iterable[_Union[Speaker, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., random_weights: _Optional[bool] = ..., seed: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., max_frames: _Optional[int] = ...) -> None: ...

class Speaker(_message.Message):
    __slots__ = ("speaker", "model_speaker", "has_voice", "turns")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEAKER_FIELD_NUMBER: _ClassVar[int]
    HAS_VOICE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    speaker: int
    model_speaker: int
    has_voice: bool
    turns: int
    def __init__(self, speaker: _Optional[int] = ..., model_speaker: _Optional[int] = ..., has_voice: _Optional[bool] = ..., turns: _Optional[int] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("frame_index", "segment_index", "start_seconds", "data")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    segment_index: int
    start_seconds: float
    data: bytes
    def __init__(self, frame_index: _Optional[int] = ..., segment_index: _Optional[int] = ..., start_seconds: _Optional[float] = ..., data: _Optional[bytes] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("frames", "audio_seconds", "elapsed_seconds", "max_frames", "prompt_tokens_done")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    frames: int
    audio_seconds: float
    elapsed_seconds: float
    max_frames: int
    prompt_tokens_done: int
    def __init__(self, frames: _Optional[int] = ..., audio_seconds: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., max_frames: _Optional[int] = ..., prompt_tokens_done: _Optional[int] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("frames", "audio_seconds", "time_to_first_audio_seconds", "real_time_factor", "elapsed_seconds", "finish_reason")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REAL_TIME_FACTOR_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    frames: int
    audio_seconds: float
    time_to_first_audio_seconds: float
    real_time_factor: float
    elapsed_seconds: float
    finish_reason: str
    def __init__(self, frames: _Optional[int] = ..., audio_seconds: _Optional[float] = ..., time_to_first_audio_seconds: _Optional[float] = ..., real_time_factor: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., finish_reason: _Optional[str] = ...) -> None: ...

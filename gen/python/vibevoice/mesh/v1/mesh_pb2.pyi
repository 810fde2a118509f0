from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "random_weights", "device", "dtype", "parameters", "modules")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    model: str
    random_weights: bool
    device: str
    dtype: str
    parameters: int
    modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., random_weights: _Optional[bool] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., parameters: _Optional[int] = ..., modules: _Optional[_Iterable[str]] = ...) -> None: ...

class ParseRequest(_message.Message):
    __slots__ = ("text", "turns", "voices")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    text: str
    turns: ScriptTurns
    voices: _containers.RepeatedCompositeFieldContainer[VoiceSlot]
    def __init__(self, text: _Optional[str] = ..., turns: _Optional[_Union[ScriptTurns, _Mapping]] = ..., voices: _Optional[_Iterable[_Union[VoiceSlot, _Mapping]]] = ...) -> None: ...

class ScriptTurns(_message.Message):
    __slots__ = ("turns",)
    TURNS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[ScriptTurn]
    def __init__(self, turns: _Optional[_Iterable[_Union[ScriptTurn, _Mapping]]] = ...) -> None: ...

class ScriptTurn(_message.Message):
    __slots__ = ("speaker", "text")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    speaker: int
    text: str
    def __init__(self, speaker: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class VoiceSlot(_message.Message):
    __slots__ = ("speaker", "frames")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    speaker: int
    frames: int
    def __init__(self, speaker: _Optional[int] = ..., frames: _Optional[int] = ...) -> None: ...

class ParseResponse(_message.Message):
    __slots__ = ("prompt_ids", "turns", "speakers", "warnings", "voice_order", "max_new_frames")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    VOICE_ORDER_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    turns: _containers.RepeatedCompositeFieldContainer[ScriptTurn]
    speakers: _containers.RepeatedCompositeFieldContainer[SpeakerMapping]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    voice_order: _containers.RepeatedScalarFieldContainer[int]
    max_new_frames: int
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., turns: _Optional[_Iterable[_Union[ScriptTurn, _Mapping]]] = ..., speakers: _Optional[_Iterable[_Union[SpeakerMapping, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., voice_order: _Optional[_Iterable[int]] = ..., max_new_frames: _Optional[int] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("script", "max_positions", "fixed_frames")
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    script: ParseRequest
    max_positions: int
    fixed_frames: int
    def __init__(self, script: _Optional[_Union[ParseRequest, _Mapping]] = ..., max_positions: _Optional[int] = ..., fixed_frames: _Optional[int] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("speakers", "warnings", "segments")
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    speakers: _containers.RepeatedCompositeFieldContainer[SpeakerMapping]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    segments: _containers.RepeatedCompositeFieldContainer[ScriptSegment]
    def __init__(self, speakers: _Optional[_Iterable[_Union[SpeakerMapping, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., segments: _Optional[_Iterable[_Union[ScriptSegment, _Mapping]]] = ...) -> None: ...

class ScriptSegment(_message.Message):
    __slots__ = ("first_turn", "turns", "prompt_ids", "voice_order", "max_new_frames", "fixed_frames", "expected_frames")
    FIRST_TURN_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    VOICE_ORDER_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FIXED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    first_turn: int
    turns: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    voice_order: _containers.RepeatedScalarFieldContainer[int]
    max_new_frames: int
    fixed_frames: int
    expected_frames: int
    def __init__(self, first_turn: _Optional[int] = ..., turns: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., voice_order: _Optional[_Iterable[int]] = ..., max_new_frames: _Optional[int] = ..., fixed_frames: _Optional[int] = ..., expected_frames: _Optional[int] = ...) -> None: ...

class SpeakerMapping(_message.Message):
    __slots__ = ("speaker", "model_speaker", "turns", "has_voice")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEAKER_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    HAS_VOICE_FIELD_NUMBER: _ClassVar[int]
    speaker: int
    model_speaker: int
    turns: int
    has_voice: bool
    def __init__(self, speaker: _Optional[int] = ..., model_speaker: _Optional[int] = ..., turns: _Optional[int] = ..., has_voice: _Optional[bool] = ...) -> None: ...

class EncodeVoiceRequest(_message.Message):
    __slots__ = ("voices", "seed", "voice_digests")
    VOICES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VOICE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Tensor]
    seed: int
    voice_digests: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, voices: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., seed: _Optional[int] = ..., voice_digests: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EncodeVoiceResponse(_message.Message):
    __slots__ = ("embeddings", "frames")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    frames: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., frames: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedFramesRequest(_message.Message):
    __slots__ = ("latents", "semantic")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    latents: Tensor
    semantic: Tensor
    def __init__(self, latents: _Optional[_Union[Tensor, _Mapping]] = ..., semantic: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EmbedFramesResponse(_message.Message):
    __slots__ = ("embeddings", "replay_frames")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FRAMES_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    replay_frames: int
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., replay_frames: _Optional[int] = ...) -> None: ...

class RenderRequest(_message.Message):
    __slots__ = ("step", "starts", "stream_ids", "positive", "negative", "ends", "shared_offer")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    ENDS_FIELD_NUMBER: _ClassVar[int]
    SHARED_OFFER_FIELD_NUMBER: _ClassVar[int]
    step: int
    starts: _containers.RepeatedCompositeFieldContainer[StreamStart]
    stream_ids: _containers.RepeatedScalarFieldContainer[int]
    positive: Tensor
    negative: Tensor
    ends: _containers.RepeatedScalarFieldContainer[int]
    shared_offer: SharedMemoryOffer
    def __init__(self, step: _Optional[int] = ..., starts: _Optional[_Iterable[_Union[StreamStart, _Mapping]]] = ..., stream_ids: _Optional[_Iterable[int]] = ..., positive: _Optional[_Union[Tensor, _Mapping]] = ..., negative: _Optional[_Union[Tensor, _Mapping]] = ..., ends: _Optional[_Iterable[int]] = ..., shared_offer: _Optional[_Union[SharedMemoryOffer, _Mapping]] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("dtype", "shape", "stride", "offset", "handle", "storage_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    handle: bytes
    storage_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class SharedMemoryOffer(_message.Message):
    __slots__ = ("device_uuid", "conditions", "ready_event")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    READY_EVENT_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    conditions: SharedTensor
    ready_event: bytes
    def __init__(self, device_uuid: _Optional[str] = ..., conditions: _Optional[_Union[SharedTensor, _Mapping]] = ..., ready_event: _Optional[bytes] = ...) -> None: ...

class SharedMemoryAccept(_message.Message):
    __slots__ = ("embeddings", "audio", "done_event", "latents", "semantic")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    DONE_EVENT_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    embeddings: SharedTensor
    audio: SharedTensor
    done_event: bytes
    latents: SharedTensor
    semantic: SharedTensor
    def __init__(self, embeddings: _Optional[_Union[SharedTensor, _Mapping]] = ..., audio: _Optional[_Union[SharedTensor, _Mapping]] = ..., done_event: _Optional[bytes] = ..., latents: _Optional[_Union[SharedTensor, _Mapping]] = ..., semantic: _Optional[_Union[SharedTensor, _Mapping]] = ...) -> None: ...

class StreamStart(_message.Message):
    __slots__ = ("stream_id", "seed", "cfg_scale", "diffusion_steps", "voice_count", "voice_max_frames", "frames_made", "replay_latents", "audio_key")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    VOICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    VOICE_MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_MADE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_LATENTS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_KEY_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    seed: int
    cfg_scale: float
    diffusion_steps: int
    voice_count: int
    voice_max_frames: int
    frames_made: int
    replay_latents: Tensor
    audio_key: str
    def __init__(self, stream_id: _Optional[int] = ..., seed: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., diffusion_steps: _Optional[int] = ..., voice_count: _Optional[int] = ..., voice_max_frames: _Optional[int] = ..., frames_made: _Optional[int] = ..., replay_latents: _Optional[_Union[Tensor, _Mapping]] = ..., audio_key: _Optional[str] = ...) -> None: ...

class StreamAudioRequest(_message.Message):
    __slots__ = ("audio_key", "frame_states")
    AUDIO_KEY_FIELD_NUMBER: _ClassVar[int]
    FRAME_STATES_FIELD_NUMBER: _ClassVar[int]
    audio_key: str
    frame_states: bool
    def __init__(self, audio_key: _Optional[str] = ..., frame_states: _Optional[bool] = ...) -> None: ...

class StreamAudioResponse(_message.Message):
    __slots__ = ("index", "audio", "latent", "semantic")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    index: int
    audio: Tensor
    latent: Tensor
    semantic: Tensor
    def __init__(self, index: _Optional[int] = ..., audio: _Optional[_Union[Tensor, _Mapping]] = ..., latent: _Optional[_Union[Tensor, _Mapping]] = ..., semantic: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RenderResponse(_message.Message):
    __slots__ = ("step", "stream_ids", "embeddings", "audio", "shared_accept", "latents", "semantic", "frames_routed", "behind_streams")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SHARED_ACCEPT_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ROUTED_FIELD_NUMBER: _ClassVar[int]
    BEHIND_STREAMS_FIELD_NUMBER: _ClassVar[int]
    step: int
    stream_ids: _containers.RepeatedScalarFieldContainer[int]
    embeddings: Tensor
    audio: Tensor
    shared_accept: SharedMemoryAccept
    latents: Tensor
    semantic: Tensor
    frames_routed: bool
    behind_streams: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., stream_ids: _Optional[_Iterable[int]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., audio: _Optional[_Union[Tensor, _Mapping]] = ..., shared_accept: _Optional[_Union[SharedMemoryAccept, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., semantic: _Optional[_Union[Tensor, _Mapping]] = ..., frames_routed: _Optional[bool] = ..., behind_streams: _Optional[_Iterable[int]] = ...) -> None: ...

class AcousticDescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AcousticDescribeModelResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: ModelInfo
    def __init__(self, info: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class CapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapacityResponse(_message.Message):
    __slots__ = ("slots", "active", "waiting", "max_positions", "step_ms", "draining", "kv_pages", "kv_pages_available", "page_size", "expected_positions", "preemptions", "waiting_live")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    WAITING_LIVE_FIELD_NUMBER: _ClassVar[int]
    slots: int
    active: int
    waiting: int
    max_positions: int
    step_ms: float
    draining: bool
    kv_pages: int
    kv_pages_available: int
    page_size: int
    expected_positions: int
    preemptions: int
    waiting_live: int
    def __init__(self, slots: _Optional[int] = ..., active: _Optional[int] = ..., waiting: _Optional[int] = ..., max_positions: _Optional[int] = ..., step_ms: _Optional[float] = ..., draining: _Optional[bool] = ..., kv_pages: _Optional[int] = ..., kv_pages_available: _Optional[int] = ..., page_size: _Optional[int] = ..., expected_positions: _Optional[int] = ..., preemptions: _Optional[int] = ..., waiting_live: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "voice_embeddings", "voice_count", "voice_max_frames", "cfg_scale", "diffusion_steps", "seed", "max_frames", "fixed_frames", "expected_frames", "background", "resume", "audio_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    VOICE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    VOICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    VOICE_MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FIXED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    AUDIO_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    voice_embeddings: Tensor
    voice_count: int
    voice_max_frames: int
    cfg_scale: float
    diffusion_steps: int
    seed: int
    max_frames: int
    fixed_frames: int
    expected_frames: int
    background: bool
    resume: ResumeHistory
    audio_key: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., voice_embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., voice_count: _Optional[int] = ..., voice_max_frames: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., diffusion_steps: _Optional[int] = ..., seed: _Optional[int] = ..., max_frames: _Optional[int] = ..., fixed_frames: _Optional[int] = ..., expected_frames: _Optional[int] = ..., background: _Optional[bool] = ..., resume: _Optional[_Union[ResumeHistory, _Mapping]] = ..., audio_key: _Optional[str] = ...) -> None: ...

class ResumeHistory(_message.Message):
    __slots__ = ("tokens_before", "tokens", "latents", "semantic")
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    tokens_before: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    latents: Tensor
    semantic: Tensor
    def __init__(self, tokens_before: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ..., semantic: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("frame", "progress", "done")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    frame: GeneratedFrame
    progress: GenerateProgress
    done: GenerateDone
    def __init__(self, frame: _Optional[_Union[GeneratedFrame, _Mapping]] = ..., progress: _Optional[_Union[GenerateProgress, _Mapping]] = ..., done: _Optional[_Union[GenerateDone, _Mapping]] = ...) -> None: ...

class GeneratedFrame(_message.Message):
    __slots__ = ("index", "segment_index", "audio", "tokens_before", "latent", "semantic")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    index: int
    segment_index: int
    audio: Tensor
    tokens_before: _containers.RepeatedScalarFieldContainer[int]
    latent: Tensor
    semantic: Tensor
    def __init__(self, index: _Optional[int] = ..., segment_index: _Optional[int] = ..., audio: _Optional[_Union[Tensor, _Mapping]] = ..., tokens_before: _Optional[_Iterable[int]] = ..., latent: _Optional[_Union[Tensor, _Mapping]] = ..., semantic: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GenerateProgress(_message.Message):
    __slots__ = ("prompt_tokens_done", "prompt_tokens")
    PROMPT_TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens_done: int
    prompt_tokens: int
    def __init__(self, prompt_tokens_done: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateDone(_message.Message):
    __slots__ = ("frames", "finish_reason")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    frames: int
    finish_reason: str
    def __init__(self, frames: _Optional[int] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class LLMDescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LLMDescribeModelResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: ModelInfo
    def __init__(self, info: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

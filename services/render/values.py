"""What one Render step carries each way, and its proto form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from vibevoice.mesh.v1 import mesh_pb2

from services.common.tensors import from_proto, to_proto


@dataclass(frozen=True)
class StreamHistory:
    """A stream that resumes after `frames_made` frames: its noise generator skips their draws, and its decoder
    and semantic-encoder state is rebuilt from `replay_latents`, the last frames' latents (W, latent), oldest
    first."""

    frames_made: int
    replay_latents: torch.Tensor


@dataclass(frozen=True)
class StreamSpec:
    """What the acoustic side needs to know about a stream when it joins."""

    stream_id: int
    seed: int
    cfg_scale: float
    diffusion_steps: int
    voice_count: int = 0
    voice_max_frames: int = 0
    history: StreamHistory | None = None  # a resumed stream
    audio_key: str = ""  # set: its frames go to Acoustic.StreamAudio's subscriber for this key (`audio_out`)

    def to_proto(self) -> mesh_pb2.StreamStart:
        start = mesh_pb2.StreamStart(
            stream_id=self.stream_id,
            seed=self.seed,
            cfg_scale=self.cfg_scale,
            diffusion_steps=self.diffusion_steps,
            voice_count=self.voice_count,
            voice_max_frames=self.voice_max_frames,
            audio_key=self.audio_key,
        )
        if self.history is not None:
            start.frames_made = self.history.frames_made
            start.replay_latents.CopyFrom(to_proto(self.history.replay_latents))
        return start

    @classmethod
    def from_proto(cls, msg: mesh_pb2.StreamStart, key: Callable[[int], int]) -> StreamSpec:
        """ValueError or RuntimeError when the replay latents are not a tensor (the caller says which field)."""
        history = None
        if msg.frames_made or msg.HasField("replay_latents"):
            history = StreamHistory(msg.frames_made, from_proto(msg.replay_latents))
        return cls(
            key(msg.stream_id),
            msg.seed,
            msg.cfg_scale,
            msg.diffusion_steps,
            msg.voice_count,
            msg.voice_max_frames,
            history,
            msg.audio_key,
        )


@dataclass
class RenderStep:
    """Join `starts`, render `ids` (their positive and negative conditions, (N, hidden) each), then end `ends`."""

    step: int = 0
    starts: list[StreamSpec] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    positive: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    ends: list[int] = field(default_factory=list)

    def to_proto(self, with_tensors: bool = True) -> mesh_pb2.RenderRequest:
        """The request; without tensors when they travel in shared GPU memory."""
        request = mesh_pb2.RenderRequest(
            step=self.step, starts=[s.to_proto() for s in self.starts], stream_ids=self.ids, ends=self.ends
        )
        if self.ids and with_tensors:
            request.positive.CopyFrom(to_proto(self.positive))
            request.negative.CopyFrom(to_proto(self.negative))
        return request

    @classmethod
    def from_proto(
        cls, msg: mesh_pb2.RenderRequest, key: Callable[[int], int], conditions: tuple | None = None
    ) -> RenderStep:
        """`key` maps the llm's stream ids to the engine's; `conditions` when they came through shared memory."""
        positive = negative = None
        if msg.stream_ids:
            if conditions is not None:
                positive, negative = conditions
            else:
                positive, negative = from_proto(msg.positive), from_proto(msg.negative)
        return cls(
            step=msg.step,
            starts=[StreamSpec.from_proto(s, key) for s in msg.starts],
            ids=[key(s) for s in msg.stream_ids],
            positive=positive,
            negative=negative,
            ends=[key(s) for s in msg.ends],
        )


@dataclass
class RenderResult:
    """Next-step input embeddings (N, hidden) and the frames' audio (N, 3200) of the rendered streams, and what a
    resume rebuilds them from: each frame's latent (N, latent) and semantic features (N, semantic)."""

    embeddings: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    semantic: torch.Tensor | None = None
    # Streams whose audio's consumer has fallen behind (`audio_out`): the llm holds them until they are not
    # reported. None: the acoustic side did not say (a step it was not asked about).
    behind: list[int] | None = None

    def fill(self, response: mesh_pb2.RenderResponse, frames: bool = True) -> mesh_pb2.RenderResponse:
        """The response; without the frames (audio, latents, semantic) when they all went to their consumers."""
        if self.embeddings is not None:
            response.embeddings.CopyFrom(to_proto(self.embeddings))
            if frames:
                response.audio.CopyFrom(to_proto(self.audio))
                response.latents.CopyFrom(to_proto(self.latents))
                response.semantic.CopyFrom(to_proto(self.semantic))
        return response

    @classmethod
    def from_proto(cls, msg: mesh_pb2.RenderResponse) -> RenderResult:
        behind = list(msg.behind_streams)
        if not msg.HasField("embeddings"):
            return cls(behind=behind)
        if msg.frames_routed:  # every stream of the step is keyed: its frames went straight to consumers
            return cls(from_proto(msg.embeddings), behind=behind)
        return cls(*(from_proto(t) for t in (msg.embeddings, msg.audio, msg.latents, msg.semantic)), behind=behind)

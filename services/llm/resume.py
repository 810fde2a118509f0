"""A Generate request that resumes a stream (GenerateRequest.resume): its history checked, and turned into what
the llm's engine (`StepHistory`) and the acoustic side (`StreamHistory`) rebuild the stream's state from.

The history holds the token decisions and each frame's latent and semantic features. The acoustic side turns
the features into the frames' input embeddings (its connectors, as a step does), in chunks that keep each
message small, and answers how many of the last frames' latents its convolutions' state needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vibevoice.mesh.v1 import mesh_pb2

from services.common.checked_tensors import checked_rows
from services.common.errors import invalid_argument, unavailable
from services.llm.prefill_plan import StepHistory
from services.render.link import RenderLink
from services.render.values import StreamHistory

EMBED_CHUNK_FRAMES = 1024  # frames per EmbedFrames call: a few MiB of embeddings each way


@dataclass(frozen=True)
class ResumeFrames:
    """A checked history: every step's token in order (speech as the audio token), and the frames' features."""

    tokens: list[int]
    latents: torch.Tensor  # (frames, latent)
    semantic: torch.Tensor  # (frames, semantic)


@dataclass(frozen=True)
class ResumeLimits:
    """What a history must fit: the stream's room and the model's token ids and feature sizes."""

    room: int  # steps the context leaves after the prompt
    max_frames: int
    fixed_frames: int
    audio_token_id: int
    between_frames: frozenset[int]  # tokens a stream may choose between frames (audio_bos, audio_eos)
    latent_size: int
    semantic_size: int


def checked_resume(resume: mesh_pb2.ResumeHistory, limits: ResumeLimits) -> ResumeFrames:
    """The history as the engine replays it, or INVALID_ARGUMENT naming the field and why."""
    frames = len(resume.tokens_before)
    if frames < 1:
        raise invalid_argument("resume.tokens_before", "a resume history has at least one frame")
    if sum(resume.tokens_before) != len(resume.tokens):
        raise invalid_argument(
            "resume.tokens", f"{len(resume.tokens)} tokens; tokens_before counts {sum(resume.tokens_before)}"
        )
    stray = next((t for t in resume.tokens if t not in limits.between_frames), None)
    if stray is not None:
        allowed = sorted(limits.between_frames)
        raise invalid_argument("resume.tokens", f"token {stray} is not one chosen between frames {allowed}")
    steps = frames + len(resume.tokens)
    if steps >= limits.room:
        raise invalid_argument(
            "resume.tokens_before", f"a history of {steps} steps does not fit: the prompt leaves room for {limits.room}"
        )
    if frames > limits.max_frames:
        raise invalid_argument("resume.tokens_before", f"{frames} frames made; the stream may make {limits.max_frames}")
    if limits.fixed_frames and (frames > limits.fixed_frames or resume.tokens):
        raise invalid_argument(
            "resume.tokens_before", f"a stream of {limits.fixed_frames} fixed frames makes speech frames only"
        )
    latents = checked_rows(resume.latents, "resume.latents", limits.latent_size, frames)
    semantic = checked_rows(resume.semantic, "resume.semantic", limits.semantic_size, frames)
    tokens: list[int] = []
    given = iter(resume.tokens)
    for before in resume.tokens_before:
        tokens.extend(next(given) for _ in range(before))
        tokens.append(limits.audio_token_id)
    return ResumeFrames(tokens, latents, semantic)


async def rebuild_history(link: RenderLink, frames: ResumeFrames, hidden: int) -> tuple[StepHistory, StreamHistory]:
    """The llm's and the acoustic side's histories: the frames' input embeddings, and the latents to replay."""
    parts, replay = [], 0
    for start in range(0, frames.latents.shape[0], EMBED_CHUNK_FRAMES):
        stop = start + EMBED_CHUNK_FRAMES
        embeddings, replay = await link.embed_frames(frames.latents[start:stop], frames.semantic[start:stop])
        parts.append(embeddings)
    embeddings = torch.cat(parts)
    if embeddings.shape != (frames.latents.shape[0], hidden):
        raise unavailable(f"the acoustic service gave embeddings of shape {tuple(embeddings.shape)}")
    made = frames.latents.shape[0]
    return StepHistory(frames.tokens, embeddings), StreamHistory(made, frames.latents[made - min(made, replay) :])

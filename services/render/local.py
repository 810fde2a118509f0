"""The acoustic engine in the llm's own process: one GPU, no hop."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from services.render.audio_out import AudioRouter, Routed, all_routed
from services.render.link import RenderEngine
from services.render.values import RenderResult, RenderStep


class LocalLink:
    """With `audio_out`, keyed streams' frames go to their mailboxes, which this process serves (StreamAudio)."""

    def __init__(self, engine: RenderEngine, audio_out: AudioRouter | None = None) -> None:
        self.engine = engine
        self.audio_out = audio_out

    async def step(self, step: RenderStep) -> RenderResult:
        if self.audio_out is None:
            return await asyncio.to_thread(self.engine.step, step)

        def render() -> tuple[RenderResult, Routed]:
            result = self.engine.step(step)
            return result, self.audio_out.take(step, result)

        result, routed = await asyncio.to_thread(render)
        self.audio_out.deliver(routed)
        behind = self.audio_out.behind(list(self.audio_out.keys))
        # Frames that went to their consumers are not copied to the llm's host as well.
        if all_routed(step, routed):
            return RenderResult(result.embeddings, behind=behind)
        return replace(result, behind=behind)

    async def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, int]:
        return await asyncio.to_thread(self.engine.embed_frames, latents, semantic), self.engine.replay_frames

    async def close(self) -> None:
        pass

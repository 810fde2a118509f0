"""The acoustic engine in the llm's own process: one GPU, no hop."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from services.render.audio_out import AudioRouter, Gathered
from services.render.link import RenderEngine
from services.render.values import RenderResult, RenderStep


class LocalLink:
    """With `audio_out`, keyed streams' frames go to their mailboxes, which this process serves (StreamAudio).

    A step answers as soon as its render is queued: its keyed frames reach the host and their mailboxes in the
    background, so the llm queues its next step while the GPU still renders this one. The next step waits for
    that delivery first, so mailboxes get every stream's start, frames and end in render order."""

    def __init__(self, engine: RenderEngine, audio_out: AudioRouter | None = None) -> None:
        self.engine = engine
        self.audio_out = audio_out
        self._routing: asyncio.Task | None = None  # the previous step's frames on their way to the mailboxes

    async def step(self, step: RenderStep) -> RenderResult:
        if self.audio_out is None:
            return await asyncio.to_thread(self.engine.step, step)
        await self.routed()

        def render() -> tuple[RenderResult, Gathered]:
            result = self.engine.step(step)
            return result, self.audio_out.gather(step, result)

        result, gathered = await asyncio.to_thread(render)
        self._routing = asyncio.create_task(self._deliver(gathered))
        # As of the steps delivered so far: a report one frame late holds a stream one frame later.
        behind = self.audio_out.behind(list(self.audio_out.keys))
        # Frames that go to their consumers are not copied to the llm's host as well.
        if gathered.all_frames(step):
            return RenderResult(result.embeddings, behind=behind)
        return replace(result, behind=behind)

    async def _deliver(self, gathered: Gathered) -> None:
        self.audio_out.deliver(await asyncio.to_thread(gathered.to_host))

    async def routed(self) -> None:
        """Waits until every step's frames are in their mailboxes."""
        if self._routing is not None:
            routing, self._routing = self._routing, None
            await routing

    async def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, int]:
        return await asyncio.to_thread(self.engine.embed_frames, latents, semantic), self.engine.replay_frames

    async def close(self) -> None:
        await self.routed()

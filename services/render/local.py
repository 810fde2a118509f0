"""The acoustic engine in the llm's own process: one GPU, no hop."""

from __future__ import annotations

import asyncio

import torch

from services.render.link import RenderEngine
from services.render.values import RenderResult, RenderStep


class LocalLink:
    def __init__(self, engine: RenderEngine) -> None:
        self.engine = engine

    async def step(self, step: RenderStep) -> RenderResult:
        return await asyncio.to_thread(self.engine.step, step)

    async def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, int]:
        return await asyncio.to_thread(self.engine.embed_frames, latents, semantic), self.engine.replay_frames

    async def close(self) -> None:
        pass

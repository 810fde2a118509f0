"""The one protocol of the Render step, on the llm's side and on the acoustic engine's."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from services.render.values import RenderResult, RenderStep


class RenderUnavailable(Exception):
    """The acoustic side failed mid-step; every stream it carried is lost."""


class RenderEngine(Protocol):
    """What renders: the acoustic engine."""

    def step(self, step: RenderStep) -> RenderResult: ...

    def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor: ...

    @property
    def replay_frames(self) -> int: ...


class RenderLink(Protocol):
    """How the llm reaches a RenderEngine: in its own process or over a Render stream."""

    async def step(self, step: RenderStep) -> RenderResult: ...

    async def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Frames made earlier -> the input embeddings they gave the llm, and how many of a resumed stream's last
        frames' latents its start must carry to rebuild the conv state (RenderUnavailable if it cannot)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class OverlappingLink(RenderLink, Protocol):
    """A link that may hold a second step in flight: `send` a step, do other work, `receive` its result.

    Results come back in the order the steps were sent. `overlaps` says whether two steps may be in flight now
    (tensors in the messages); where both sides share one set of buffers it is False and a step is sent and
    received before the next is sent.
    """

    @property
    def overlaps(self) -> bool: ...

    async def send(self, step: RenderStep) -> None: ...

    async def receive(self) -> RenderResult: ...

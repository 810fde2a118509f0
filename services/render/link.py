"""The one protocol of the Render step, on the llm's side and on the acoustic engine's."""

from __future__ import annotations

from typing import Protocol

from services.render.values import RenderResult, RenderStep


class RenderUnavailable(Exception):
    """The acoustic side failed mid-step; every stream it carried is lost."""


class RenderEngine(Protocol):
    """What renders: the acoustic engine."""

    def step(self, step: RenderStep) -> RenderResult: ...


class RenderLink(Protocol):
    """How the llm reaches a RenderEngine: in its own process or over a Render stream."""

    async def step(self, step: RenderStep) -> RenderResult: ...

    async def close(self) -> None: ...

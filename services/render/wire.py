"""The Render step over one bidirectional gRPC stream to a remote acoustic service.

With shared GPU memory (both services on one GPU) the stream's first message offers the llm's buffers and
the steps' messages carry only stream ids (`shared_memory`); elsewhere the tensors ride in the messages, and
a second step may be sent before the first's result is read (`send`, `receive`): the llm's pipelined step
keeps one half of its batch in flight while it decodes the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NoReturn

import grpc
import torch
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.tensors import from_proto, to_proto
from services.render.link import RenderUnavailable
from services.render.shared_memory import LLMSharedMemory
from services.render.values import RenderResult, RenderStep

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
EMBED_TIMEOUT_S = 30.0


class WireLink:
    """A remote acoustic service over one bidirectional Render stream, opened on first use.

    With `shared` (the llm on a GPU) the stream's first message offers shared GPU memory; if the acoustic
    service runs on the same GPU it accepts, and steps' tensors stay on the device (`shared_memory`).
    """

    def __init__(self, address: str, shared: LLMSharedMemory | None = None) -> None:
        self.address = address
        self.shared = shared
        self.channel: grpc.aio.Channel | None = None
        self.call = None
        self._sent: deque[tuple[int, bool]] = deque()  # steps sent and not yet received: (streams rendered, shared)

    async def _open(self):
        if self.call is not None and self.call.done():  # a draining acoustic service ends an idle llm's stream
            await self.close()
        if self.call is None:
            # no tracing interceptors: the stream lives as long as the process, one message per step
            self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            try:  # a restarted acoustic service is picked up here; a dead one fails the step quickly
                await asyncio.wait_for(self.channel.channel_ready(), CONNECT_TIMEOUT_S)
            except TimeoutError as e:
                await self.close()
                raise RenderUnavailable(f"acoustic service at {self.address} is unreachable") from e
            self.call = mesh_pb2_grpc.AcousticStub(self.channel).Render()
            if self.shared is not None and not await self._offer_shared_memory():
                # Both sides must agree on where a step's tensors are: start over with a stream that offers none.
                await self.close()
                self.shared = None
                return await self._open()
            if self.shared is None or not self.shared.active:
                log.info("render stream to %s: tensors over the wire", self.address)
        return self.call

    async def _offer_shared_memory(self) -> bool:
        """False if this side cannot share its buffers or map the acoustic service's."""
        try:
            offer = self.shared.offer()
        except (RuntimeError, ValueError) as e:
            log.warning("render stream to %s: cannot share GPU memory: %s", self.address, e)
            return False
        await self.call.write(mesh_pb2.RenderRequest(shared_offer=offer))
        response = await self.call.read()
        if response is grpc.aio.EOF:
            await self.close()
            raise RenderUnavailable(f"acoustic service at {self.address} closed the render stream")
        if not response.HasField("shared_accept"):
            return True
        try:
            self.shared.accepted(response.shared_accept)
        except (RuntimeError, ValueError) as e:
            log.warning("render stream to %s: cannot map the acoustic service's GPU memory: %s", self.address, e)
            return False
        log.info("render stream to %s: tensors in shared GPU memory", self.address)
        return True

    @property
    def overlaps(self) -> bool:
        """Whether a second step may be sent before the first's result is read: the stream is open and its
        tensors ride in the messages (shared GPU memory has one set of buffers)."""
        return self.call is not None and not (self.shared is not None and self.shared.active)

    async def step(self, step: RenderStep) -> RenderResult:
        await self.send(step)
        return await self.receive()

    async def send(self, step: RenderStep) -> None:
        """Write one step; its result is read by a later `receive`, in the order the steps were sent."""
        try:
            call = await self._open()
            shared = self.shared is not None and self.shared.active
            if step.ids and shared:
                self.shared.send(step.positive, step.negative)
            await call.write(step.to_proto(with_tensors=not shared))
        except grpc.aio.AioRpcError as e:
            await self._failed(e)
        except asyncio.InvalidStateError as e:  # the acoustic service ended the stream just before this write
            await self.close()
            raise RenderUnavailable(f"acoustic service at {self.address} closed the render stream") from e
        self._sent.append((len(step.ids), shared))

    async def receive(self) -> RenderResult:
        """The result of the oldest step sent and not yet received."""
        rendered, shared = self._sent.popleft()
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as e:
            await self._failed(e)
        if response is grpc.aio.EOF:
            await self.close()
            raise RenderUnavailable(f"acoustic service at {self.address} closed the render stream")
        behind = list(response.behind_streams)
        if not rendered:
            return RenderResult(behind=behind)
        if shared:
            results = self.shared.receive(rendered)
            return RenderResult(*(results[:1] if response.frames_routed else results), behind=behind)
        return RenderResult.from_proto(response)

    async def _failed(self, e: grpc.aio.AioRpcError) -> NoReturn:
        await self.close()
        raise RenderUnavailable(f"acoustic service at {self.address} failed: {e.code().name}: {e.details()}") from e

    async def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> tuple[torch.Tensor, int]:
        request = mesh_pb2.EmbedFramesRequest(latents=to_proto(latents), semantic=to_proto(semantic))
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            try:
                response = await mesh_pb2_grpc.AcousticStub(channel).EmbedFrames(
                    request, timeout=EMBED_TIMEOUT_S, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as e:
                raise RenderUnavailable(
                    f"acoustic service at {self.address} failed: {e.code().name}: {e.details()}"
                ) from e
        return from_proto(response.embeddings), response.replay_frames

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()
        self.call = self.channel = None
        self._sent.clear()  # their results went with the stream
        if self.shared is not None:
            self.shared.forget()

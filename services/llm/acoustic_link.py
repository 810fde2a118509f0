"""How the llm reaches the acoustic engine: in its own process, or over one gRPC Render stream.

Both speak the same step: streams that join, the conditions of the streams that spoke, streams that end;
and both answer with next-step embeddings and audio. They must produce the same audio.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import grpc
import torch
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.acoustic.engine import AcousticEngine, StreamSpec
from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.shared_render import LLMSharedMemory
from services.common.tensors import from_proto, to_proto

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
StepResult = tuple[torch.Tensor | None, torch.Tensor | None]


class AcousticUnavailable(Exception):
    """The acoustic side failed mid-step; every stream it carried is lost."""


class AcousticLink(Protocol):
    async def step(
        self,
        step: int,
        starts: list[StreamSpec],
        ids: list[int],
        positive: torch.Tensor | None,
        negative: torch.Tensor | None,
        ends: list[int],
    ) -> StepResult: ...

    async def close(self) -> None: ...


class LocalAcoustic:
    """The acoustic engine in this process (one GPU, no hop)."""

    def __init__(self, engine: AcousticEngine) -> None:
        self.engine = engine

    async def step(self, step, starts, ids, positive, negative, ends) -> StepResult:
        return await asyncio.to_thread(self.engine.step, starts, ids, positive, negative, ends)

    async def close(self) -> None:
        pass


class RemoteAcoustic:
    """A remote acoustic service over one bidirectional Render stream, opened on first use.

    With `shared` (the llm on a GPU) the stream's first message offers shared GPU memory; if the acoustic
    service runs on the same GPU it accepts, and steps' tensors stay on the device (`shared_render`).
    """

    def __init__(self, address: str, shared: LLMSharedMemory | None = None) -> None:
        self.address = address
        self.shared = shared
        self.channel: grpc.aio.Channel | None = None
        self.call = None

    async def _open(self):
        if self.call is None:
            # no tracing interceptors: the stream lives as long as the process, one message per step
            self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            try:  # a restarted acoustic service is picked up here; a dead one fails the step quickly
                await asyncio.wait_for(self.channel.channel_ready(), CONNECT_TIMEOUT_S)
            except TimeoutError as e:
                await self.close()
                raise AcousticUnavailable(f"acoustic service at {self.address} is unreachable") from e
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
            raise AcousticUnavailable(f"acoustic service at {self.address} closed the render stream")
        if not response.HasField("shared_accept"):
            return True
        try:
            self.shared.accepted(response.shared_accept)
        except (RuntimeError, ValueError) as e:
            log.warning("render stream to %s: cannot map the acoustic service's GPU memory: %s", self.address, e)
            return False
        log.info("render stream to %s: tensors in shared GPU memory", self.address)
        return True

    async def step(self, step, starts, ids, positive, negative, ends) -> StepResult:
        request = mesh_pb2.RenderRequest(
            step=step,
            starts=[
                mesh_pb2.StreamStart(
                    stream_id=s.stream_id,
                    seed=s.seed,
                    cfg_scale=s.cfg_scale,
                    diffusion_steps=s.diffusion_steps,
                    voice_count=s.voice_count,
                    voice_max_frames=s.voice_max_frames,
                )
                for s in starts
            ],
            stream_ids=ids,
            ends=ends,
        )
        try:
            call = await self._open()
            shared = self.shared is not None and self.shared.active
            if ids and shared:
                self.shared.send(positive, negative)
            elif ids:
                request.positive.CopyFrom(to_proto(positive))
                request.negative.CopyFrom(to_proto(negative))
            await call.write(request)
            response = await call.read()
        except grpc.aio.AioRpcError as e:
            await self.close()
            raise AcousticUnavailable(
                f"acoustic service at {self.address} failed: {e.code().name}: {e.details()}"
            ) from e
        if response is grpc.aio.EOF:
            await self.close()
            raise AcousticUnavailable(f"acoustic service at {self.address} closed the render stream")
        if not ids:
            return None, None
        if shared:
            return self.shared.receive(len(ids))
        return from_proto(response.embeddings), from_proto(response.audio)

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()
        self.call = self.channel = None
        if self.shared is not None:
            self.shared.forget()

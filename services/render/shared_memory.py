"""The Render stream's tensors in shared GPU memory, when the llm and the acoustic service share a GPU.

Over the wire a step's tensors are copied device -> host, serialized, sent, parsed and copied host -> device,
twice, and each side waits for the GPU before it can answer. On one GPU both sides instead map each other's
buffers once, when the stream opens (the llm offers, the acoustic service accepts), and a step's messages
carry only stream ids. Ordering is kept on the GPU with two interprocess events, so neither side waits on
the host for the other's kernels:

    llm:      write conditions rows [0, N), record `ready`, send the request
    acoustic: wait for `ready` (on its stream), render, write results rows [0, N), record `done`, answer
    llm:      wait for `done` (on its stream), read results rows [0, N)

Each buffer is rewritten only after its reader's next event: the llm writes the next step's conditions after
waiting for `done`, and the acoustic service writes results after waiting for the next `ready`, which the llm
records after it has queued its reads of the previous results.
"""

from __future__ import annotations

import torch
from vibevoice.mesh.v1 import mesh_pb2

from services.common.audio import SAMPLES_PER_FRAME
from services.common.cuda_ipc import device_uuid, new_event, open_event, open_tensor, share_tensor


class LLMSharedMemory:
    """The llm's half: owns the conditions buffer and the `ready` event, maps the acoustic side's results."""

    def __init__(self, device: torch.device, rows: int, hidden: int, dtype: torch.dtype) -> None:
        self.device = device
        self.conditions = torch.zeros(2, rows, hidden, device=device, dtype=dtype)
        self.ready = new_event()
        self.results: tuple[torch.Tensor, ...] = ()  # embeddings, audio, latents, semantic features
        self.done: torch.cuda.Event | None = None

    def offer(self) -> mesh_pb2.SharedMemoryOffer:
        return mesh_pb2.SharedMemoryOffer(
            device_uuid=device_uuid(self.device),
            conditions=share_tensor(self.conditions),
            ready_event=self.ready.ipc_handle(),
        )

    def accepted(self, msg: mesh_pb2.SharedMemoryAccept) -> None:
        self.results = tuple(
            open_tensor(t, self.device) for t in (msg.embeddings, msg.audio, msg.latents, msg.semantic)
        )
        self.done = open_event(msg.done_event, self.device)

    def forget(self) -> None:
        """The acoustic side went away: its buffers are no longer ours to read."""
        self.results, self.done = (), None

    @property
    def active(self) -> bool:
        return self.done is not None

    def send(self, positive: torch.Tensor, negative: torch.Tensor) -> None:
        n = positive.shape[0]
        self.conditions[0, :n].copy_(positive)
        self.conditions[1, :n].copy_(negative)
        self.ready.record(torch.cuda.current_stream(self.device))

    def receive(self, n: int) -> tuple[torch.Tensor, ...]:
        """This step's results (embeddings, audio, latents, semantic features), readable in order on the current
        stream until the next `send`."""
        torch.cuda.current_stream(self.device).wait_event(self.done)
        return tuple(t[:n] for t in self.results)


class AcousticSharedMemory:
    """The acoustic service's half: maps the llm's conditions, owns the results buffers and the `done` event."""

    def __init__(
        self, offer: mesh_pb2.SharedMemoryOffer, device: torch.device, dtype: torch.dtype, features: tuple[int, int]
    ) -> None:
        self.device = device
        self.conditions = open_tensor(offer.conditions, device)
        self.ready = open_event(offer.ready_event, device)
        rows, hidden = self.conditions.shape[1], self.conditions.shape[2]
        # embeddings, audio, and each frame's latent and semantic features (`features`: their widths)
        widths = (hidden, SAMPLES_PER_FRAME, *features)
        self.results = tuple(torch.zeros(rows, w, device=device, dtype=dtype) for w in widths)
        self.done = new_event()

    @classmethod
    def accept(
        cls, offer: mesh_pb2.SharedMemoryOffer, device: torch.device, dtype: torch.dtype, features: tuple[int, int]
    ) -> tuple[AcousticSharedMemory | None, str]:
        """Maps the offer if this process runs on the offering GPU; else (None, why not)."""
        if device.type != "cuda":
            return None, "the acoustic engine is not on a GPU"
        if offer.device_uuid != device_uuid(device):
            return None, "the llm runs on another GPU"
        try:
            return cls(offer, device, dtype, features), ""
        except (RuntimeError, ValueError) as e:  # e.g. separate containers without a shared IPC namespace
            return None, f"cannot map the llm's GPU memory: {e}"

    def answer(self) -> mesh_pb2.SharedMemoryAccept:
        embeddings, audio, latents, semantic = (share_tensor(t) for t in self.results)
        return mesh_pb2.SharedMemoryAccept(
            embeddings=embeddings, audio=audio, latents=latents, semantic=semantic, done_event=self.done.ipc_handle()
        )

    def conditions_for(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's conditions, readable in order on the current stream."""
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        return self.conditions[0, :n], self.conditions[1, :n]

    def publish(self, results: tuple[torch.Tensor, ...]) -> None:
        """A step's embeddings, audio, latents and semantic features, rows [0, N)."""
        for buffer, part in zip(self.results, results, strict=True):
            buffer[: part.shape[0]].copy_(part)
        self.done.record(torch.cuda.current_stream(self.device))

"""Audio leaves the acoustic service for its consumer directly: a keyed stream's llm frames carry no audio, and
what Acoustic.StreamAudio gives equals, bit for bit, what the llm gives for the same stream without a key."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from google.rpc import code_pb2
from grpc_status import rpc_status
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.common.errors import RequestError, bad_request_fields
from services.common.tensors import from_proto, to_proto
from services.synthesis.backends import Backends

FRAMES = 5


def request(**fields) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(prompt_ids=[101, 200, 102, 300], fixed_frames=FRAMES, seed=7, **fields)


@pytest.fixture(scope="module")
def stubs(mesh):
    with (
        grpc.insecure_channel(f"127.0.0.1:{mesh.ports.llm}") as llm,
        grpc.insecure_channel(f"127.0.0.1:{mesh.ports.acoustic}") as acoustic,
    ):
        yield mesh_pb2_grpc.LLMStub(llm), mesh_pb2_grpc.AcousticStub(acoustic)


def frames(events) -> list[mesh_pb2.GeneratedFrame]:
    return [e.frame for e in events if e.WhichOneof("event") == "frame"]


def test_keyed_audio_bypasses_the_llm_and_equals_the_unkeyed_path(stubs):
    llm, acoustic = stubs
    plain = frames(llm.Generate(request(), timeout=60))
    audio = acoustic.StreamAudio(mesh_pb2.StreamAudioRequest(audio_key="direct-1", frame_states=True), timeout=60)
    keyed = frames(llm.Generate(request(audio_key="direct-1"), timeout=60))
    direct = list(audio)  # the call ends after the stream's last frame
    assert len(plain) == len(keyed) == len(direct) == FRAMES
    for p, k, d in zip(plain, keyed, direct, strict=True):
        assert not (k.HasField("audio") or k.HasField("latent") or k.HasField("semantic"))
        assert (k.index, k.segment_index, list(k.tokens_before)) == (p.index, p.segment_index, list(p.tokens_before))
        assert d.index == p.index
        for name in ("audio", "latent", "semantic"):
            assert from_proto(getattr(d, name)).equal(from_proto(getattr(p, name))), name


def test_a_live_call_gets_the_audio_alone(stubs):
    """Only a job keeps each frame's latent and semantic features; a live call's frames carry the audio alone."""
    llm, acoustic = stubs
    audio = acoustic.StreamAudio(mesh_pb2.StreamAudioRequest(audio_key="live-1"), timeout=60)
    frames(llm.Generate(request(audio_key="live-1"), timeout=60))
    direct = list(audio)
    assert len(direct) == FRAMES
    assert all(d.HasField("audio") and not (d.HasField("latent") or d.HasField("semantic")) for d in direct)


def test_bad_audio_keys_are_refused_with_the_field(stubs):
    llm, acoustic = stubs
    for call in (
        lambda: list(llm.Generate(request(audio_key="not a key"), timeout=30)),
        lambda: list(acoustic.StreamAudio(mesh_pb2.StreamAudioRequest(audio_key=""), timeout=30)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in bad_request_fields(rpc_status.from_call(e.value))] == ["audio_key"]


class EndedAudio:
    """An audio stream that has ended (or failed with `error`) before the llm's frame."""

    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.error = error

    async def read(self):
        if self.error is not None:
            raise self.error
        return grpc.aio.EOF


@pytest.mark.parametrize("code", [None, grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND])
def test_audio_stream_that_ends_or_fails_first_is_unavailable_naming_acoustic(code):
    error = None if code is None else grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    async def main():
        backends = Backends("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
        with pytest.raises(RequestError) as e:
            await backends._with_audio(mesh_pb2.GeneratedFrame(index=3), EndedAudio(error))
        assert e.value.status.code == code_pb2.UNAVAILABLE
        assert "acoustic service at 127.0.0.1:2" in e.value.status.message

    asyncio.run(main())


class OneAudioPart:
    def __init__(self, index: int) -> None:
        self.index = index

    async def read(self):
        return mesh_pb2.StreamAudioResponse(index=self.index, audio=to_proto(torch.zeros(4)))


def test_audio_of_another_frame_is_never_paired_with_a_frame():
    async def main():
        backends = Backends("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
        frame = mesh_pb2.GeneratedFrame(index=3)
        await backends._with_audio(frame, OneAudioPart(3))
        assert frame.HasField("audio")
        with pytest.raises(RequestError) as e:
            await backends._with_audio(mesh_pb2.GeneratedFrame(index=4), OneAudioPart(5))
        assert e.value.status.code == code_pb2.UNAVAILABLE and "frame 5 came for frame 4" in e.value.status.message

    asyncio.run(main())

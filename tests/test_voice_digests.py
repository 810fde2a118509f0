"""The gateway sends a voice's samples to the acoustic service once; after that the voice goes by its digest,
and back to its samples when the acoustic service no longer holds it. Only NOT_FOUND means that."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from vibevoice.mesh.v1 import mesh_pb2

from services.common.audio import voice_digest
from services.common.errors import RequestError
from services.synthesis import backends as backends_module
from services.synthesis.backends import Backends
from services.synthesis.voice_cache import Voice

EMBEDDINGS = mesh_pb2.EncodeVoiceResponse(embeddings=mesh_pb2.Tensor(dtype="float32", shape=[1, 1]), frames=[1])


class FakeAcoustic:
    """Records what each EncodeVoice carried; answers by digest only for digests it took samples of."""

    def __init__(self, backends: Backends) -> None:
        self.held: set[bytes] = set()
        self.calls: list[str] = []
        self.timeouts: list[float | None] = []
        self.fail_with: grpc.StatusCode | None = None
        backends._encode_voice = self.by_samples
        backends._acoustic_ready = self.ready
        backends.acoustic = self

    async def ready(self, timeout: float) -> None:
        pass

    async def by_samples(self, data: bytes, timeout: float | None = None, **_) -> mesh_pb2.EncodeVoiceResponse:
        request = mesh_pb2.EncodeVoiceRequest.FromString(data)
        self.calls.append("samples")
        self.timeouts.append(timeout)
        for v in request.voices:
            self.held.add(voice_digest(np.frombuffer(v.data, dtype=np.float32)))
        return EMBEDDINGS

    async def EncodeVoice(self, request: mesh_pb2.EncodeVoiceRequest, **_) -> mesh_pb2.EncodeVoiceResponse:  # noqa: N802
        self.calls.append("digests")
        if self.fail_with is not None:
            raise grpc.aio.AioRpcError(self.fail_with, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        if not set(request.voice_digests) <= self.held:
            raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
        return EMBEDDINGS


async def encode(backends: Backends, voices: list[Voice]) -> mesh_pb2.GenerateRequest:
    generate = mesh_pb2.GenerateRequest(seed=3)
    await backends.encode_voices(generate, list(range(len(voices))), voices, None)
    return generate


def voices(seed: int, n: int = 2) -> list[Voice]:
    rng = np.random.default_rng(seed)
    return [Voice.of(rng.standard_normal(4000 + i).astype(np.float32)) for i in range(n)]


def test_samples_go_once_then_digests_and_samples_again_when_the_acoustic_service_lost_them():
    async def scenario():
        backends = Backends("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
        acoustic = FakeAcoustic(backends)
        alice_and_bob = voices(1)
        assert (await encode(backends, alice_and_bob)).voice_embeddings == EMBEDDINGS.embeddings
        assert acoustic.calls == ["samples"]  # never sent before: no digest round trip first
        await encode(backends, alice_and_bob)
        assert acoustic.calls == ["samples", "digests"]
        await encode(backends, [alice_and_bob[0], voices(2, 1)[0]])  # one voice new: the samples of both
        assert acoustic.calls[-1] == "samples"
        acoustic.held.clear()  # the acoustic service restarted
        generate = await encode(backends, alice_and_bob)
        assert acoustic.calls[-2:] == ["digests", "samples"] and generate.voice_count == 2

    asyncio.run(scenario())


def test_an_acoustic_failure_other_than_not_found_is_the_callers_error():
    async def scenario():
        backends = Backends("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
        acoustic = FakeAcoustic(backends)
        await encode(backends, voices(3))
        acoustic.fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RequestError) as info:
            await encode(backends, voices(3))
        assert "acoustic service at 127.0.0.1:1" in info.value.status.message
        assert acoustic.calls == ["samples", "digests"]  # no second try with the samples

    asyncio.run(scenario())


def test_the_digests_kept_are_the_most_recently_used(monkeypatch):
    monkeypatch.setattr(backends_module, "VOICES_SENT_KEPT", 2)

    async def scenario():
        backends = Backends("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
        acoustic = FakeAcoustic(backends)
        a, b, c = voices(4, 3)
        await encode(backends, [a])
        await encode(backends, [b])
        await encode(backends, [a])  # by digest: a is now the most recently used
        await encode(backends, [c])  # a third: b, the least recently used, is forgotten
        assert acoustic.calls == ["samples", "samples", "digests", "samples"]
        await encode(backends, [a])
        await encode(backends, [b])
        assert acoustic.calls[-2:] == ["digests", "samples"]

    asyncio.run(scenario())


def test_the_encoding_has_the_callers_deadline_not_the_wait_for_a_restarting_service():
    """Four long voices on a CPU take longer than the seconds a restarting acoustic service gets: the encoding
    itself runs to the caller's deadline, or to `VOICE_ENCODE_S` without one."""

    async def scenario():
        backends = Backends("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
        acoustic = FakeAcoustic(backends)
        generate = mesh_pb2.GenerateRequest(seed=3)
        await backends.encode_voices(generate, [0], voices(5, 1), 42.0)
        await backends.encode_voices(generate, [0], voices(6, 1), None)
        assert acoustic.timeouts == [42.0, backends_module.VOICE_ENCODE_S]
        assert backends_module.VOICE_ENCODE_S > backends_module.VOICE_READY_S

    asyncio.run(scenario())


def test_an_acoustic_service_that_never_answers_is_unavailable_after_the_ready_wait(monkeypatch):
    monkeypatch.setattr(backends_module, "VOICE_READY_S", 0.3)

    async def scenario():
        backends = Backends("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")  # nothing listens on port 1
        started = asyncio.get_running_loop().time()
        with pytest.raises(RequestError) as info:
            await backends.encode_voices(mesh_pb2.GenerateRequest(seed=3), [0], voices(7, 1), None)
        assert asyncio.get_running_loop().time() - started < 5.0
        return info.value.status

    status = asyncio.run(scenario())
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "acoustic service at 127.0.0.1:1" in status.message

"""No request can wedge or leak the llm: every way a stream ends frees its llm slot and its acoustic rows,
and a bad internal call is refused without disturbing the streams that are playing."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_status import rpc_status
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import tts_pb2

from services.acoustic.engine import AcousticEngine
from services.client import build_request, synthesize
from services.common.audio import voice_digest
from services.common.checkpoint import resolve_checkpoint
from services.common.errors import bad_request_fields
from services.common.tensors import to_proto
from services.common.wire_arrays import array_proto
from services.llm.engine import LMEngine, LMStream
from services.llm.scheduler import Failed, Finished, Job, Scheduler
from services.render.local import LocalLink
from services.render.values import RenderResult, RenderStep, StreamSpec
from tests.conftest import SCRIPTS

SLOTS = 2


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(str(tiny_checkpoint))


class FlakyAcoustic(LocalLink):
    """The in-process acoustic engine, failing chosen steps after it has done their work (a lost answer)."""

    def __init__(self, engine: AcousticEngine, fail_steps: set[int]) -> None:
        super().__init__(engine)
        self.fail_steps = fail_steps
        self.calls = 0

    async def step(self, step: RenderStep) -> RenderResult:
        result = await super().step(step)
        self.calls += 1
        if self.calls in self.fail_steps:
            raise RuntimeError("the answer was lost")
        return result


def job(scheduler: Scheduler, frames: int, seed: int = 1, voices: torch.Tensor | None = None) -> Job:
    prompt = [100 + seed, 200, scheduler.engine.audio_bos_token_id]
    stream = LMStream(prompt, voices, fixed_frames=frames, max_frames=1000)
    return Job(stream, StreamSpec(scheduler.new_stream_id(), seed, 1.3, 10))


async def outcome(j: Job) -> object:
    while True:
        event = await asyncio.wait_for(j.events.get(), 60)
        if isinstance(event, Finished | Failed):
            return event


def test_every_way_a_stream_ends_frees_both_sides(ckpt):
    async def main():
        acoustic = AcousticEngine(ckpt, max_streams=SLOTS)
        lm = LMEngine(ckpt, max_streams=SLOTS)
        link = FlakyAcoustic(acoustic, fail_steps={3, 7, 11})
        scheduler = Scheduler(lm, link)
        # More failed steps than slots: before, each one leaked the acoustic rows until every step failed.
        outcomes = []
        for round_ in range(4):
            a, b = job(scheduler, 6, seed=round_), job(scheduler, 40, seed=round_ + 10)
            scheduler.submit(a)
            scheduler.submit(b)
            await asyncio.sleep(0.3)
            scheduler.cancel(b)  # a cancel mid-stream
            outcomes.append(await outcome(a))  # b gets no event once cancelled: its caller has gone
        done = job(scheduler, 4)
        scheduler.submit(done)
        final = await outcome(done)
        await asyncio.sleep(0.2)
        return outcomes, final, lm, acoustic, scheduler

    outcomes, final, lm, acoustic, scheduler = asyncio.run(main())
    assert any(isinstance(o, Failed) for o in outcomes), "the flaky link must have failed some streams"
    assert isinstance(final, Finished) and final.frames == 4
    assert lm.streams == [] and scheduler.active == []
    assert acoustic.streams == {} and acoustic.order == []


def test_cancelling_one_of_two_identical_waiting_requests(ckpt):
    async def main():
        lm = LMEngine(ckpt, max_streams=1)
        scheduler = Scheduler(lm, LocalLink(AcousticEngine(ckpt, max_streams=1)))
        voices = torch.zeros(1, lm.hidden)
        prompt = [100, lm.audio_token_id, lm.audio_bos_token_id]
        busy = job(scheduler, 30)
        twins = [Job(LMStream(prompt, voices.clone(), 3, 100), StreamSpec(9, 1, 1.3, 10)) for _ in range(2)]
        scheduler.submit(busy)
        for t in twins:
            scheduler.submit(t)
        await asyncio.sleep(0)
        scheduler.cancel(twins[0])  # compared tensors before: "Boolean value of Tensor ... is ambiguous"
        scheduler.cancel(busy)
        return await outcome(twins[1]), list(scheduler.waiting)

    result, waiting = asyncio.run(main())
    assert isinstance(result, Finished) and result.frames == 3
    assert waiting == []


def generate(llm_port: int, request: mesh_pb2.GenerateRequest) -> grpc.RpcError | None:
    with grpc.insecure_channel(f"127.0.0.1:{llm_port}") as channel:
        try:
            for _ in mesh_pb2_grpc.LLMStub(channel).Generate(request, timeout=30):
                pass
        except grpc.RpcError as e:
            return e
    return None


BOS = 151652
AUDIO = 151654


def resume_history(frames: int, latents=None, semantic=None, **fields) -> mesh_pb2.ResumeHistory:
    """A resume history of `frames` speech frames of the tiny model (64 latent, 128 semantic features)."""
    fields.setdefault("tokens_before", [0] * frames)
    latents = torch.zeros(frames, 64) if latents is None else latents
    semantic = torch.zeros(frames, 128) if semantic is None else semantic
    return mesh_pb2.ResumeHistory(latents=to_proto(latents), semantic=to_proto(semantic), **fields)


BAD_GENERATE = {
    "token id beyond the vocabulary": (mesh_pb2.GenerateRequest(prompt_ids=[10, 10**9, BOS]), "prompt_ids"),
    "negative token id": (mesh_pb2.GenerateRequest(prompt_ids=[-5, BOS]), "prompt_ids"),
    "placeholders without voices": (mesh_pb2.GenerateRequest(prompt_ids=[AUDIO, AUDIO, BOS]), "voice_count"),
    "voice embeddings of the wrong shape": (
        mesh_pb2.GenerateRequest(
            prompt_ids=[AUDIO, BOS], voice_count=1, voice_max_frames=1, voice_embeddings=to_proto(torch.zeros(1, 3))
        ),
        "voice_embeddings",
    ),
    "voice embeddings that are not finite": (
        mesh_pb2.GenerateRequest(
            prompt_ids=[AUDIO, BOS],
            voice_count=1,
            voice_max_frames=1,
            voice_embeddings=to_proto(torch.full((1, 64), float("nan"))),
        ),
        "voice_embeddings",
    ),
    "a tensor whose bytes do not fit its shape": (
        mesh_pb2.GenerateRequest(
            prompt_ids=[AUDIO, BOS],
            voice_count=1,
            voice_max_frames=1,
            voice_embeddings=mesh_pb2.Tensor(dtype="float32", shape=[1, 64], data=b"\0" * 7),
        ),
        "voice_embeddings",
    ),
    "absurd voice draws": (
        mesh_pb2.GenerateRequest(prompt_ids=[BOS], voice_count=4, voice_max_frames=2**31),
        "voice_max_frames",
    ),
    "cfg scale out of range": (mesh_pb2.GenerateRequest(prompt_ids=[BOS], cfg_scale=float("inf")), "cfg_scale"),
    "diffusion steps out of range": (
        mesh_pb2.GenerateRequest(prompt_ids=[BOS], diffusion_steps=10**6),
        "diffusion_steps",
    ),
    "a resume history longer than the context": (
        mesh_pb2.GenerateRequest(prompt_ids=[100, BOS], resume=resume_history(9000)),
        "resume.tokens_before",
    ),
    "resume features of mismatched lengths": (
        mesh_pb2.GenerateRequest(prompt_ids=[100, BOS], resume=resume_history(2, semantic=torch.zeros(1, 128))),
        "resume.semantic",
    ),
    "resume latents of the wrong size": (
        mesh_pb2.GenerateRequest(prompt_ids=[100, BOS], resume=resume_history(1, latents=torch.zeros(1, 3))),
        "resume.latents",
    ),
    "resume latents that are not finite": (
        mesh_pb2.GenerateRequest(
            prompt_ids=[100, BOS], resume=resume_history(1, latents=torch.full((1, 64), float("nan")))
        ),
        "resume.latents",
    ),
    "resume tokens that tokens_before does not count": (
        mesh_pb2.GenerateRequest(prompt_ids=[100, BOS], resume=resume_history(1, tokens=[BOS])),
        "resume.tokens",
    ),
    "speech among the tokens between frames": (
        mesh_pb2.GenerateRequest(prompt_ids=[100, BOS], resume=resume_history(1, tokens_before=[1], tokens=[AUDIO])),
        "resume.tokens",
    ),
}


def test_bad_internal_generate_calls_are_refused_while_a_stream_plays(mesh, envoy_address):
    request = build_request(
        (SCRIPTS / "2p_short.txt").read_text(), {}, tts_pb2.AUDIO_FORMAT_PCM_F32, seed=5, fixed_frames=30
    )
    solo = synthesize(envoy_address, request, timeout=300)
    during: list = []
    player = threading.Thread(target=lambda: during.append(synthesize(envoy_address, request, timeout=300)))
    player.start()
    for name, (bad, field) in BAD_GENERATE.items():
        err = generate(mesh.ports.llm, bad)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        fields = bad_request_fields(rpc_status.from_call(err))
        assert fields and fields[0][0] == field, (name, fields)
    player.join()
    assert during[0].data == solo.data
    # and the llm still serves: nothing was wedged
    assert generate(mesh.ports.llm, mesh_pb2.GenerateRequest(prompt_ids=[100, BOS], fixed_frames=2)) is None


def test_bad_internal_embed_frames_calls_are_refused(mesh):
    cases = {
        "no frames": (mesh_pb2.EmbedFramesRequest(), "latents"),
        "latents of the wrong size": (
            mesh_pb2.EmbedFramesRequest(latents=to_proto(torch.zeros(2, 5)), semantic=to_proto(torch.zeros(2, 128))),
            "latents",
        ),
        "fewer semantic rows than latents": (
            mesh_pb2.EmbedFramesRequest(latents=to_proto(torch.zeros(2, 64)), semantic=to_proto(torch.zeros(1, 128))),
            "semantic",
        ),
        "features that are not finite": (
            mesh_pb2.EmbedFramesRequest(
                latents=to_proto(torch.zeros(1, 64)), semantic=to_proto(torch.full((1, 128), float("inf")))
            ),
            "semantic",
        ),
    }
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.acoustic}") as channel:
        stub = mesh_pb2_grpc.AcousticStub(channel)
        for name, (bad, field) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.EmbedFrames(bad, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert bad_request_fields(rpc_status.from_call(info.value))[0][0] == field, name
        good = stub.EmbedFrames(
            mesh_pb2.EmbedFramesRequest(latents=to_proto(torch.zeros(3, 64)), semantic=to_proto(torch.zeros(3, 128))),
            timeout=30,
        )
        assert list(good.embeddings.shape) == [3, 64] and good.replay_frames > 0


def test_resumed_render_starts_that_cannot_rebuild_are_refused(mesh):
    def start(frames_made: int, replay: torch.Tensor) -> mesh_pb2.RenderRequest:
        resumed = mesh_pb2.StreamStart(
            stream_id=1,
            seed=1,
            cfg_scale=1.3,
            diffusion_steps=10,
            frames_made=frames_made,
            replay_latents=to_proto(replay),
        )
        return mesh_pb2.RenderRequest(starts=[resumed])

    cases = {
        "noise to skip beyond any context": (start(2**40, torch.zeros(3, 64)), "starts[0].frames_made"),
        "fewer latents than the convolutions reach": (start(500, torch.zeros(3, 64)), "starts[0].replay_latents"),
        "latents of the wrong size": (start(3, torch.zeros(3, 7)), "starts[0].replay_latents"),
    }
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.acoustic}") as channel:
        stub = mesh_pb2_grpc.AcousticStub(channel)
        for name, (bad, field) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Render(iter([bad]), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert bad_request_fields(rpc_status.from_call(info.value))[0][0] == field, name


def test_bad_internal_encode_voice_calls_are_refused(mesh):
    cases = {
        "no voices": mesh_pb2.EncodeVoiceRequest(),
        "five voices": mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.zeros(3200))] * 5),
        "a voice of two dimensions": mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.zeros(2, 3200))]),
        "an empty voice": mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.zeros(0))]),
        "a voice longer than a minute": mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.zeros(24000 * 61))]),
        "integer samples": mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.zeros(3200, dtype=torch.int64))]),
        "samples that are not finite": mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.full((3200,), np.inf))]),
        "a digest of 31 bytes": mesh_pb2.EncodeVoiceRequest(voice_digests=[b"d" * 31]),
        "five digests": mesh_pb2.EncodeVoiceRequest(voice_digests=[b"d" * 32] * 5),
        "samples and digests": mesh_pb2.EncodeVoiceRequest(
            voices=[to_proto(torch.zeros(3200))], voice_digests=[b"d" * 32]
        ),
    }
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.acoustic}") as channel:
        stub = mesh_pb2_grpc.AcousticStub(channel)
        for name, bad in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.EncodeVoice(bad, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert bad_request_fields(rpc_status.from_call(info.value)), name
        good = stub.EncodeVoice(mesh_pb2.EncodeVoiceRequest(voices=[to_proto(torch.zeros(3200))]), timeout=30)
        assert list(good.frames) == [1]


def test_a_voice_encoded_before_goes_by_its_digest_with_the_same_embeddings(mesh):
    """The acoustic service answers a voice it has encoded from the digest of its samples alone, exactly as from
    the samples; a digest it does not hold gets NOT_FOUND (the caller then sends the samples)."""
    voice = (0.1 * np.random.default_rng(11).standard_normal(3 * 3200 + 17)).astype(np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.acoustic}") as channel:
        stub = mesh_pb2_grpc.AcousticStub(channel)
        unknown = mesh_pb2.EncodeVoiceRequest(voice_digests=[voice_digest(voice)], seed=7)
        with pytest.raises(grpc.RpcError) as info:
            stub.EncodeVoice(unknown, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "voice_digests[0]" in info.value.details()
        by_samples = stub.EncodeVoice(mesh_pb2.EncodeVoiceRequest(voices=[array_proto(voice)], seed=7), timeout=30)
        by_digest = stub.EncodeVoice(unknown, timeout=30)
        assert list(by_digest.frames) == list(by_samples.frames) == [4]
        assert by_digest.embeddings == by_samples.embeddings
        other_seed = stub.EncodeVoice(mesh_pb2.EncodeVoiceRequest(voice_digests=[voice_digest(voice)], seed=8))
        assert other_seed.embeddings.data != by_samples.embeddings.data  # the seed's draws still apply

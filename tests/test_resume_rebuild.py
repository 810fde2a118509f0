"""A stream rebuilt from its history goes on as the uninterrupted one does, in the engines alone (no processes).

A stream runs to its end, recording what GeneratedFrame carries per frame (the tokens chosen before it, its
latent and semantic features, its audio). A second stream of the same request is then resumed from the first
N frames of that record: the llm prefills its three branches from the history, the acoustic engine replays the
last frames' latents and skips the noise of the frames made. From there on it must choose the same tokens and
make the same audio (within 1e-4 of the peak, CPU float32).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from vibevoice.mesh.v1 import mesh_pb2

from services.acoustic.engine import AcousticEngine
from services.common.checkpoint import resolve_checkpoint
from services.common.errors import RequestError
from services.common.tensors import to_proto
from services.llm.engine import LMEngine, LMStream
from services.llm.resume import ResumeLimits, checked_resume, rebuild_history
from services.llm.scheduler import Failed, Finished, Frame, Job, Scheduler
from services.render.local import LocalLink
from services.render.values import StreamSpec
from tests.conftest import SCRIPTS
from tests.prompts import reference_prompt

SCRIPT = (SCRIPTS / "2p_short.txt").read_text()
SEED = 0  # the tiny model speaks in four segments with this seed, audio_eos and audio_bos between them


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def engines(ckpt):
    return LMEngine(ckpt, max_streams=4), AcousticEngine(ckpt, max_streams=4)


@pytest.fixture(scope="module")
def prompt(ckpt, tiny_checkpoint):
    return reference_prompt(AutoTokenizer.from_pretrained(tiny_checkpoint), ckpt.config, SCRIPT, [])


def limits(ckpt, lm: LMEngine, fixed_frames: int = 0) -> ResumeLimits:
    cfg = ckpt.config
    return ResumeLimits(
        room=lm.max_positions - 100,
        max_frames=10_000,
        fixed_frames=fixed_frames,
        audio_token_id=cfg.audio_token_id,
        between_frames=frozenset({cfg.audio_bos_token_id, cfg.audio_eos_token_id}),
        latent_size=cfg.audio_config.hidden_size,
        semantic_size=cfg.semantic_model_config.hidden_size,
    )


def history(frames: list[Frame]) -> mesh_pb2.ResumeHistory:
    return mesh_pb2.ResumeHistory(
        tokens_before=[len(f.tokens_before) for f in frames],
        tokens=[t for f in frames for t in f.tokens_before],
        latents=to_proto(torch.stack([f.latent for f in frames])),
        semantic=to_proto(torch.stack([f.semantic for f in frames])),
    )


def run(engines, prompt, resume: mesh_pb2.ResumeHistory | None = None, fixed_frames: int = 0, ckpt=None):
    """The stream's frames and its finish reason, from a fresh start or resumed from `resume`."""
    lm, acoustic = engines

    async def main():
        link = LocalLink(acoustic)
        scheduler = Scheduler(lm, link)
        stream = LMStream(prompt, None, fixed_frames, 10_000)
        spec = StreamSpec(scheduler.new_stream_id(), SEED, 1.3, 10)
        job = Job(stream, spec)
        if resume is not None:
            frames = checked_resume(resume, limits(ckpt, lm, fixed_frames))
            stream.history, replay = await rebuild_history(link, frames, lm.hidden)
            job.spec = StreamSpec(spec.stream_id, SEED, 1.3, 10, history=replay)
        scheduler.submit(job)
        frames: list[Frame] = []
        while True:
            event = await asyncio.wait_for(job.events.get(), 120)
            if isinstance(event, Frame):
                frames.append(event)
            elif isinstance(event, Finished):
                return frames, event.reason
            elif isinstance(event, Failed):
                raise AssertionError(event.message)

    return asyncio.run(main())


def assert_goes_on_alike(resumed: list[Frame], whole: list[Frame], at: int) -> None:
    rest = whole[at:]
    assert [(f.index, f.segment, f.tokens_before) for f in resumed] == [
        (f.index, f.segment, f.tokens_before) for f in rest
    ]
    ours = np.concatenate([f.audio.numpy() for f in resumed])
    theirs = np.concatenate([f.audio.numpy() for f in rest])
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.fixture(scope="module")
def whole(engines, prompt):
    frames, reason = run(engines, prompt)
    return frames, reason


def test_a_rebuilt_stream_goes_on_as_the_uninterrupted_one_at_every_frame(ckpt, engines, prompt, whole):
    """The model's own decisions: resumed after every frame, before and after audio_eos and audio_bos."""
    frames, reason = whole
    assert reason == "eos" and {f.segment for f in frames} == {0, 1, 2, 3}
    assert [len(f.tokens_before) for f in frames].count(0) < len(frames) - 1  # tokens between frames to replay
    for at in range(1, len(frames)):
        resumed, resumed_reason = run(engines, prompt, history(frames[:at]), ckpt=ckpt)
        assert resumed_reason == reason
        assert_goes_on_alike(resumed, frames, at)


def test_a_stream_longer_than_the_convolutions_reach_replays_only_its_last_frames(ckpt, engines, prompt):
    """The acoustic state comes from the last `replay_frames` latents alone: the frames before them are not sent."""
    replay = engines[1].replay_frames
    total, at = replay + 15, replay + 8
    frames, _ = run(engines, prompt, fixed_frames=total)
    lm, acoustic = engines
    starts = []
    start = acoustic.start
    acoustic.start = lambda spec: starts.append(spec) or start(spec)
    try:
        resumed, reason = run(engines, prompt, history(frames[:at]), fixed_frames=total, ckpt=ckpt)
    finally:
        del acoustic.start
    (spec,) = starts
    assert (spec.history.frames_made, spec.history.replay_latents.shape[0]) == (at, replay)
    assert reason == "fixed_frames" and len(resumed) == total - at
    assert_goes_on_alike(resumed, frames, at)


def test_histories_that_cannot_be_rebuilt_are_refused_with_the_field(ckpt, engines, whole):
    lm, _ = engines
    frames = whole[0][:4]
    good = history(frames)

    def field(resume, **changes) -> str:
        with pytest.raises(RequestError) as e:
            checked_resume(resume, ResumeLimits(**{**limits(ckpt, lm).__dict__, **changes}))
        return e.value.status.message.split(":")[0]

    too_long = mesh_pb2.ResumeHistory()
    too_long.CopyFrom(good)
    assert field(too_long, room=3) == "resume.tokens_before"
    short = mesh_pb2.ResumeHistory()
    short.CopyFrom(good)
    short.semantic.CopyFrom(to_proto(torch.stack([f.semantic for f in frames[:3]])))
    assert field(short) == "resume.semantic"
    wide = mesh_pb2.ResumeHistory()
    wide.CopyFrom(good)
    wide.latents.CopyFrom(to_proto(torch.zeros(4, 65)))
    assert field(wide) == "resume.latents"
    counted = mesh_pb2.ResumeHistory()
    counted.CopyFrom(good)
    counted.tokens_before[0] += 1
    assert field(counted) == "resume.tokens"
    assert field(mesh_pb2.ResumeHistory()) == "resume.tokens_before"

"""run_segments against a stand-in llm: what carries across seams (frame and speech segment numbers, the
max_audio_seconds budget, seeds) and where a script stops."""

from __future__ import annotations

import asyncio

from vibevoice.mesh.v1 import mesh_pb2
from vibevoice.tts.v1 import tts_pb2

from services.synthesis.backends import Prepared
from services.synthesis.options import Options
from services.synthesis.segments import Finished, Progress, SegmentStart, run_segments, segment_seed

SEED = 99
SPOKEN = 6  # frames the stand-in model speaks per segment before its end of sequence


class FakeLLM:
    """Speaks SPOKEN frames in two speech segments per stream, or stops at its max_frames or fixed_frames."""

    def __init__(self) -> None:
        self.requests: list[mesh_pb2.GenerateRequest] = []

    async def encode_voices(self, generate, voice_order, voices, time_remaining) -> None:
        generate.voice_count = len(voice_order)

    async def generate(self, generate: mesh_pb2.GenerateRequest, timeout):
        self.requests.append(generate)
        yield mesh_pb2.GenerateResponse(progress=mesh_pb2.GenerateProgress(prompt_tokens_done=len(generate.prompt_ids)))
        frames = generate.fixed_frames or min(SPOKEN, generate.max_frames)
        for i in range(frames):
            yield mesh_pb2.GenerateResponse(frame=mesh_pb2.GeneratedFrame(index=i, segment_index=i * 2 // SPOKEN))
        reason = "fixed_frames" if generate.fixed_frames else "eos" if frames == SPOKEN else "max_frames"
        yield mesh_pb2.GenerateResponse(done=mesh_pb2.GenerateDone(frames=frames, finish_reason=reason))


def prepared(segments: int, fixed: list[int] | None = None) -> Prepared:
    return Prepared(
        generate=mesh_pb2.GenerateRequest(request_id="r", seed=SEED),
        segments=[
            mesh_pb2.ScriptSegment(
                first_turn=i,
                turns=1,
                prompt_ids=[1] * (10 + i),
                max_new_frames=100,
                fixed_frames=(fixed or [0] * segments)[i],
            )
            for i in range(segments)
        ],
        header=tts_pb2.StreamHeader(),
    )


def options(max_frames: int = 0, fixed_frames: int = 0) -> Options:
    return Options(
        format=0, encoder="pcm_f32", cfg_scale=1.3, diffusion_steps=10, seed=SEED, max_frames=max_frames,
        fixed_frames=fixed_frames,
    )  # fmt: skip


def events(llm: FakeLLM, plan: Prepared, opts: Options, start: SegmentStart | None = None) -> list:
    async def collect() -> list:
        return [e async for e in run_segments(llm, plan, opts, [], lambda: None, start)]

    return asyncio.run(collect())


def test_frames_and_speech_segments_go_on_across_seams_with_each_segments_seed():
    llm = FakeLLM()
    out = events(llm, prepared(3), options())
    frames = [e for e in out if isinstance(e, mesh_pb2.GeneratedFrame)]
    assert [f.index for f in frames] == list(range(3 * SPOKEN))
    assert [f.segment_index for f in frames] == [i * 2 // SPOKEN for i in range(3 * SPOKEN)]
    assert [(s.index, s.first_frame, s.first_speech) for s in out if isinstance(s, SegmentStart)] == [
        (0, 0, 0), (1, SPOKEN, 2), (2, 2 * SPOKEN, 4)
    ]  # fmt: skip
    assert [r.seed for r in llm.requests] == [SEED, segment_seed(SEED, 1), segment_seed(SEED, 2)]
    assert len({r.seed for r in llm.requests}) == 3
    assert [e.prompt_tokens_done for e in out if isinstance(e, Progress)] == [10, 10 + 11, 10 + 11 + 12]
    assert out[-1] == Finished(3 * SPOKEN, "eos")


def test_max_audio_seconds_is_one_budget_for_the_whole_script():
    llm = FakeLLM()
    out = events(llm, prepared(3), options(max_frames=SPOKEN + 2))
    assert [r.max_frames for r in llm.requests] == [SPOKEN + 2, 2]  # the second gets what the first left
    assert out[-1] == Finished(SPOKEN + 2, "max_audio_seconds")
    # A budget spent exactly at a seam stops the script before the next segment starts.
    llm = FakeLLM()
    out = events(llm, prepared(3), options(max_frames=SPOKEN))
    assert len(llm.requests) == 1 and out[-1] == Finished(SPOKEN, "max_audio_seconds")


def test_a_segment_without_a_share_of_fixed_frames_is_skipped():
    llm = FakeLLM()
    out = events(llm, prepared(3, fixed=[2, 0, 1]), options(fixed_frames=3))
    assert [r.fixed_frames for r in llm.requests] == [2, 1]
    assert [r.seed for r in llm.requests] == [SEED, segment_seed(SEED, 2)]
    assert [f.index for f in out if isinstance(f, mesh_pb2.GeneratedFrame)] == [0, 1, 2]
    assert out[-1] == Finished(3, "fixed_frames")


def test_a_resumed_script_starts_at_its_segment():
    llm = FakeLLM()
    out = events(llm, prepared(3), options(), SegmentStart(1, SPOKEN, 2))
    assert [r.seed for r in llm.requests] == [segment_seed(SEED, 1), segment_seed(SEED, 2)]
    assert [f.index for f in out if isinstance(f, mesh_pb2.GeneratedFrame)][0] == SPOKEN
    assert out[-1] == Finished(3 * SPOKEN, "eos")

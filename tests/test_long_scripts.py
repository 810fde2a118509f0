"""Scripts beyond the llm's context run as consecutive segments, in Synthesize and in jobs alike: one stream,
frames numbered on across seams, audio equal to each segment's turns sent alone with its seed."""

from __future__ import annotations

import io
from dataclasses import replace

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_status import rpc_status
from vibevoice.tts.v1 import jobs_pb2, tts_pb2, tts_pb2_grpc

from services.common.checkpoint import resolve_checkpoint
from services.common.errors import bad_request_fields
from services.mesh import Mesh
from services.plan import voice_frames
from services.synthesis.segments import segment_seed
from services.text_parser.prompt import PromptBuilder
from services.text_parser.script import ScriptError, parse_text
from services.text_parser.segments import plan_segments
from tests.conftest import VOICES, cpu_mesh
from tests.test_jobs import assert_close, create, jobs, succeeded, wait_for

SCRIPT = "\n".join(
    [
        "Speaker 1: Welcome back to the show, everyone.",
        "Speaker 2: Thanks, it is good to be here today.",
        "Speaker 1: Let us talk about the weather.",
        "Speaker 2: It rained all week in the city.",
        "Speaker 1: And the forecast for the weekend?",
        "Speaker 2: Sunny, they say, but I doubt it.",
    ]
)
FRAMES = 30
SEED = 21
FLOAT = tts_pb2.AUDIO_FORMAT_PCM_F32


def short_voice(name: str, seconds: float = 0.5) -> bytes:
    audio, rate = sf.read(VOICES / name, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, audio[: int(seconds * rate)], rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


VOICE_FILES = {1: short_voice("en-Alice_woman.wav"), 2: short_voice("en-Carter_man.wav")}


def smallest_context(model: str) -> int:
    """The smallest context (as `--max-context` sets it) that holds every turn of SCRIPT in a segment of its own,
    so most turns get one."""
    ckpt = resolve_checkpoint(model)
    builder = PromptBuilder.from_pretrained(ckpt.path, ckpt.config)
    script = parse_text(SCRIPT)
    frames = voice_frames(script, VOICE_FILES)
    for context in range(64, 4096, 4):
        try:
            if len(plan_segments(script, builder, frames, context, fixed_frames=FRAMES)) >= 3:
                return context
        except ScriptError:  # the voices or a turn do not fit yet
            continue
    raise AssertionError("no context splits the script in three")


@pytest.fixture(scope="module")
def long_mesh(tiny_checkpoint, tmp_path_factory):
    """A mesh whose llm holds a few turns per stream: SCRIPT needs at least three segments."""
    mesh = cpu_mesh(tiny_checkpoint, tmp_path_factory, "long-scripts")
    mesh.llm_config = replace(mesh.llm_config, max_context=smallest_context(str(tiny_checkpoint)))
    with mesh:
        yield mesh


def request(text: str, voices: dict[int, bytes], seed: int, frames: int | None) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(
        text=text,
        voices=[tts_pb2.VoicePrompt(speaker=s, audio=a) for s, a in sorted(voices.items())],
        format=FLOAT,
        options=tts_pb2.GenerationOptions(seed=seed, fixed_frames=frames),
    )


def stream(mesh: Mesh, req: tts_pb2.SynthesizeRequest) -> list[tts_pb2.SynthesizeResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.envoy}") as channel:
        return list(tts_pb2_grpc.TextToSpeechStub(channel).Synthesize(req, timeout=300))


def audio_of(responses: list[tts_pb2.SynthesizeResponse]) -> np.ndarray:
    return np.frombuffer(b"".join(r.audio.data for r in responses if r.HasField("audio")), dtype="<f4")


def test_a_script_beyond_the_context_is_one_stream_of_its_segments(long_mesh):
    job = create(long_mesh, "long-script", request(SCRIPT, VOICE_FILES, SEED, FRAMES))
    job = wait_for(long_mesh, job.name, succeeded)
    segments = list(job.segments)
    assert len(segments) >= 3
    turns = SCRIPT.splitlines()
    # Every turn once, in order.
    assert [s.first_turn for s in segments] == list(np.cumsum([0] + [s.turns for s in segments[:-1]]))
    assert sum(s.turns for s in segments) == len(turns)
    # The job's frames go on across segments, each starting where the one before ended.
    assert [s.first_frame for s in segments] == list(np.cumsum([0] + [s.frames for s in segments[:-1]]))
    assert sum(s.frames for s in segments) == job.frames_done == FRAMES

    responses = stream(long_mesh, request(SCRIPT, VOICE_FILES, SEED, FRAMES))
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds.count("header") == 1 and kinds[0] == "header" and kinds.count("summary") == 1
    assert kinds[-1] == "summary" and responses[-1].summary.frames == FRAMES
    assert responses[-1].summary.finish_reason == "fixed_frames"
    assert [r.audio.frame_index for r in responses if r.HasField("audio")] == list(range(FRAMES))
    # Progress is over the whole script: all its frames, and the prompts of every segment read in turn.
    progress = [r.progress for r in responses if r.HasField("progress")]
    assert {p.max_frames for p in progress} == {FRAMES}
    read = [p.prompt_tokens_done for p in progress]
    assert read == sorted(read) and read[-1] == responses[0].header.prompt_tokens
    audio = audio_of(responses)

    # Each segment alone: its turns, its speakers' voices, its seed and its share of the frames.
    alone = []
    for s in segments:
        part = turns[s.first_turn : s.first_turn + s.turns]
        speakers = {int(line.split()[1].rstrip(":")) for line in part}
        voices = {k: v for k, v in VOICE_FILES.items() if k in speakers}
        seed = segment_seed(SEED, s.index)
        alone.append(audio_of(stream(long_mesh, request("\n".join(part), voices, seed, s.frames))))
    assert_close(audio, np.concatenate(alone))
    downloaded = jobs(long_mesh).GetJobAudio(
        jobs_pb2.GetJobAudioRequest(name=job.name, format=FLOAT), metadata=[("x-api-key", "tests")]
    )
    assert np.array_equal(np.frombuffer(b"".join(p.data for p in downloaded), dtype="<f4"), audio)


def test_a_turn_too_long_for_any_segment_is_refused_by_name(long_mesh):
    text = SCRIPT.replace("Speaker 2: It rained", "Speaker 2: " + "rain " * 200 + "It rained")
    with pytest.raises(grpc.RpcError) as refused:
        stream(long_mesh, request(text, VOICE_FILES, SEED, FRAMES))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(refused.value)
    [(field, reason)] = bad_request_fields(status)
    assert field == "text" and reason.startswith("turn 4 (speaker 2, ")

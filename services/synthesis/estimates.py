"""What a request is expected to cost before it runs: its frames and its KV positions, for admission."""

from __future__ import annotations

from vibevoice.tts.v1 import tts_pb2

from services.common.frames import SAMPLES_PER_FRAME
from services.common.stream_size import expected_branch_positions, expected_frames

PROMPT_OVERHEAD_TOKENS = 128  # the system prompt and the speaker and turn markers, about


def words(request: tts_pb2.SynthesizeRequest) -> int:
    text = " ".join(t.text for t in request.turns.turns) if request.WhichOneof("script") == "turns" else request.text
    return len(text.split())


def estimated_frames(request: tts_pb2.SynthesizeRequest) -> int:
    """A job's audio: fixed frames, or the script's words at the spoken rate (stream_size.expected_frames)."""
    if request.options.HasField("fixed_frames"):
        return request.options.fixed_frames
    return expected_frames(words(request))


def estimated_positions(request: tts_pb2.SynthesizeRequest, max_positions: int = 0) -> int:
    """The KV positions a job is expected to hold at once, over its three branches, for admission and
    shortest-job-first: a prompt of about two tokens a word, the voices' frames and the system prompt, and the
    frames it makes. A script beyond the llm's context (`max_positions` per branch; 0: not known) runs as one
    segment after another, and no branch of a segment holds more than the context."""
    voice_frames = sum(len(v.audio) for v in request.voices) // (2 * SAMPLES_PER_FRAME)  # as 16-bit samples
    prompt = 2 * words(request) + voice_frames + PROMPT_OVERHEAD_TOKENS
    branches = expected_branch_positions(prompt, estimated_frames(request))
    return sum(min(b, max_positions) if max_positions else b for b in branches)

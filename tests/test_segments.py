"""Segment plans: long scripts split at turn boundaries, each segment within the context, prompts counted exactly."""

from __future__ import annotations

import math
import subprocess

import pytest

from services import cli
from services.common.audio import decode_voice
from services.common.frames import SAMPLES_PER_FRAME
from services.common.stream_size import TURN_TOKENS
from services.common.tiny_model import qwen_tokenizer_dir, tiny_config
from services.text_parser.prompt import PromptBuilder
from services.text_parser.script import ParsedScript, ScriptError, Turn, parse_text
from services.text_parser.segments import FRAME_MARGIN_PERCENT, Segment, TurnTooLong, plan_segments
from tests.conftest import SCRIPTS, VOICES
from tests.test_cli import one_error_line, vvmesh

VOICE_FILES = {1: "en-Alice_woman.wav", 2: "en-Carter_man.wav", 3: "en-Frank_man.wav", 4: "en-Maya_woman.wav"}


def model(shape: str) -> tuple[PromptBuilder, int]:
    """The prompt builder and context of a model shape, from its config alone (no weights)."""
    config = tiny_config(shape)
    return PromptBuilder.from_pretrained(qwen_tokenizer_dir(), config), config.text_config.max_position_embeddings


@pytest.fixture(scope="module")
def tiny() -> tuple[PromptBuilder, int]:
    return model("tiny")


@pytest.fixture(scope="module")
def voices() -> dict[int, int]:
    """Model speaker -> frames of the four demo voices, counted as the gateway counts them."""
    return {
        s - 1: math.ceil(len(decode_voice((VOICES / f).read_bytes())) / SAMPLES_PER_FRAME)
        for s, f in VOICE_FILES.items()
    }


def script(name: str) -> ParsedScript:
    return parse_text((SCRIPTS / name).read_text())


def check_plan(
    whole: ParsedScript, segments: list[Segment], builder: PromptBuilder, voices: dict[int, int], context: int
):
    # In order, at turn boundaries, nothing lost or repeated.
    assert [t for s in segments for t in s.turns] == whole.turns
    assert [s.first_turn for s in segments] == [sum(len(s.turns) for s in segments[:i]) for i in range(len(segments))]
    for s in segments:
        assert s.turns
        # Numbered as in the whole script, so every speaker keeps its voice.
        assert s.script.shift == whole.shift
        # The prompt as the text_parser builds it, with every voice, to the token.
        assert s.prompt_tokens == len(builder.build(s.script, voices)[0])
        assert s.frames == 3 * s.words  # 2.5 words a second at 7.5 frames a second
        assert s.margin_frames == math.ceil(s.frames * FRAME_MARGIN_PERCENT / 100)
        assert s.positions == s.prompt_tokens + s.frames + s.margin_frames + TURN_TOKENS
        assert s.positions <= context


def test_tiny_model_splits_a_long_script_into_at_least_three_segments(tiny, voices):
    builder, context = tiny
    assert context == 8192
    whole = script("4p_climate_45min.txt")
    segments = plan_segments(whole, builder, voices, context)
    assert len(segments) >= 3
    check_plan(whole, segments, builder, voices, context)


def test_the_100_minute_script_with_the_1_5b_config(voices):
    builder, context = model("1.5b")
    assert context == 65536
    whole = script("4p_climate_100min.txt")
    # It does not fit one context: prompt and expected frames alone are over it.
    [one] = plan_segments(whole, builder, {}, 2**40)
    assert one.prompt_tokens == 22344 and one.prompt_tokens + one.frames > context
    for voiced in ({}, voices):
        segments = plan_segments(whole, builder, voiced, context)
        assert len(segments) >= 2
        check_plan(whole, segments, builder, voiced, context)
        assert all(s.positions < 65536 for s in segments)
        # The room is shared out: no segment is filled to the brim while another is half empty.
        sizes = [s.positions for s in segments]
        assert max(sizes) - min(sizes) < 0.1 * context


def test_a_script_that_fits_is_one_segment(tiny, voices):
    builder, context = tiny
    whole = script("2p_goat.txt")
    [segment] = plan_segments(whole, builder, voices, context)
    assert segment.turns == whole.turns
    assert segment.prompt_tokens == len(builder.build(whole, voices)[0])


def test_fixed_frames_are_shared_out_by_words_without_margin(tiny):
    builder, context = tiny
    whole = script("4p_climate_45min.txt")
    segments = plan_segments(whole, builder, {}, context, fixed_frames=20000)
    assert len(segments) >= 3
    assert sum(s.frames for s in segments) == 20000
    for s in segments:
        assert s.margin_frames == 0
        assert s.positions == s.prompt_tokens + s.frames + TURN_TOKENS <= context
        assert abs(s.frames - 20000 * s.words / 9458) <= 1  # the script's words


def test_a_turn_too_long_for_any_segment_is_named_with_its_numbers(tiny, voices):
    builder, context = tiny
    long_turn = Turn(2, " ".join(["word"] * 1800))
    whole = ParsedScript([Turn(1, "Hello there."), long_turn, Turn(1, "Bye.")], shift=1)
    with pytest.raises(TurnTooLong) as refused:
        plan_segments(whole, builder, voices, context, field_name="turns")
    prompt = len(builder.build(ParsedScript([long_turn], shift=1), voices)[0])
    need = prompt + 5400 + 1080 + TURN_TOKENS
    assert refused.value.field == "turns"
    assert refused.value.reason == (
        f"turn 2 (speaker 2, 1800 words) needs {need} positions ({prompt} prompt tokens with the system prompt and "
        f"voices, 5400 expected frames, 1080 frames of margin, {TURN_TOKENS} turn tokens); the context holds 8192: "
        "split it into shorter turns"
    )
    # Without the voices and the margin the same turn fits.
    [segment] = plan_segments(ParsedScript([long_turn], shift=1), builder, {}, context, margin_percent=0)
    assert segment.positions <= context


def test_voices_that_fill_the_context_are_refused(tiny):
    builder, context = tiny
    with pytest.raises(ScriptError) as refused:
        plan_segments(script("2p_short.txt"), builder, {0: 8000, 1: 200}, context)
    assert refused.value.field == "voices"
    assert "the context holds 8192" in refused.value.reason


def test_vvmesh_plan_prints_the_segments(tiny_checkpoint, tmp_path, capsys):
    name = SCRIPTS / "4p_climate_45min.txt"
    result = vvmesh("plan", str(name), "--model", str(tiny_checkpoint), "--voice", f"1={VOICES / VOICE_FILES[1]}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "8,192 positions" in lines[2]
    assert lines[3].endswith("exceeds the context")
    header = next(i for i, line in enumerate(lines) if line.startswith("segment"))
    rows = [line.split() for line in lines[header + 1 :]]
    assert lines[header - 1].startswith(f"{len(rows)} segments") and len(rows) >= 3
    # Each row: number, first-last, (turns), words, prompt, frames, margin, positions, share of the context.
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    ranges = [tuple(map(int, r[1].split("-"))) for r in rows]
    assert ranges[0][0] == 1 and ranges[-1][1] == 211
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(int(r[7].replace(",", "")) <= 8192 for r in rows)

    too_long = tmp_path / "long.txt"
    too_long.write_text("Speaker 1: Hi.\nSpeaker 2: " + "word " * 3000 + "\n")
    # The same command in this process (a second interpreter would import transformers again for one line).
    code = cli.main(["plan", str(too_long), "--model", str(tiny_checkpoint)])
    error = one_error_line(subprocess.CompletedProcess([], code, *capsys.readouterr()))
    assert error.startswith("error: text: turn 2 (speaker 2, 3000 words) needs ")
    assert error.endswith("the context holds 8192: split it into shorter turns")

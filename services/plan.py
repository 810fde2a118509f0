"""`vvmesh plan`: the segments a script would be generated in, without generating (loads the tokenizer only)."""

from __future__ import annotations

from services.common.audio import decode_voice
from services.common.checkpoint import resolve_checkpoint
from services.common.frames import FRAMES_PER_SECOND, SAMPLES_PER_FRAME
from services.text_parser.prompt import PromptBuilder
from services.text_parser.script import ParsedScript, ScriptError, parse_text
from services.text_parser.segments import FRAME_MARGIN_PERCENT, Segment, plan_segments

# A context no script reaches: the whole script as one segment, priced as the plan prices each segment.
_UNLIMITED = 2**62


def voice_frames(script: ParsedScript, voices: dict[int, bytes]) -> dict[int, int]:
    """Model speaker -> frames of that speaker's voice prompt, as the gateway counts them (24 kHz samples)."""
    frames: dict[int, int] = {}
    for speaker, data in sorted(voices.items()):
        if speaker not in script.speakers:
            raise ScriptError("voices", f"speaker {speaker} has a voice but does not speak in the script")
        frames[script.model_speaker(speaker)] = -(-len(decode_voice(data)) // SAMPLES_PER_FRAME)
    return frames


def _minutes(frames: int) -> str:
    return f"{frames / FRAMES_PER_SECOND / 60:.1f} min"


def _table(segments: list[Segment], context: int) -> list[str]:
    rows = [("segment", "turns", "words", "prompt", "frames", "margin", "positions", "of context")]
    for i, s in enumerate(segments, start=1):
        first = s.first_turn + 1
        rows.append(
            (
                str(i),
                f"{first}-{first + len(s.turns) - 1} ({len(s.turns)})",
                f"{s.words:,}",
                f"{s.prompt_tokens:,}",
                f"{s.frames:,}",
                f"{s.margin_frames:,}",
                f"{s.positions:,}",
                f"{s.positions / context:.0%}",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    # Turn ranges read left-aligned, numbers right-aligned.
    aligned = [
        [cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths, strict=True))]
        for row in rows
    ]
    return ["  ".join(row).rstrip() for row in aligned]


def plan_report(text: str, name: str, model: str, max_context: int | None, voices: dict[int, bytes]) -> str:
    """The plan for a script as `vvmesh plan` prints it."""
    ckpt = resolve_checkpoint(model)
    context = max_context or ckpt.config.text_config.max_position_embeddings
    builder = PromptBuilder.from_pretrained(ckpt.path, ckpt.config)
    script = parse_text(text)
    frames = voice_frames(script, voices)
    [whole] = plan_segments(script, builder, frames, _UNLIMITED)
    segments = plan_segments(script, builder, frames, context)
    voiced = ", ".join(f"speaker {s}: {frames[script.model_speaker(s)]} frames" for s in sorted(voices)) or "none"
    fits = "fits the context" if whole.positions <= context else "exceeds the context"
    lines = [
        f"{name}: {len(script.turns)} turns, {whole.words:,} words, speakers {', '.join(map(str, script.speakers))}",
        f"voices: {voiced}",
        f"model {model}: context {context:,} positions; margin: {FRAME_MARGIN_PERCENT}% of the expected frames",
        f"whole script: {whole.prompt_tokens:,} prompt tokens and {whole.frames:,} frames ({_minutes(whole.frames)}), "
        f"{whole.positions:,} positions: {fits}",
        f"{len(segments)} segment{'s' if len(segments) > 1 else ''}, generated in order with the same voices:",
        *_table(segments, context),
    ]
    return "\n".join(lines)

"""Scripts as people write them ("Speaker 1: ...") -> validated turns with model speaker indices.

The rules are the reference processor's: a turn is a line matching `^Speaker\\s+(\\d+)\\s*:\\s*(.*)$`
(case-insensitive); other lines are skipped with a warning; if the smallest speaker number is above 0, every
number is shifted down by one (Speaker 1..4 become the model's speakers 0..3). A byte-order mark before the first
line (what some editors save UTF-8 files with) is not part of the script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_SPEAKERS = 4
MAX_SCRIPT_BYTES = 512 * 1024
# Each turn takes at least five prompt tokens, so no context holds this many; an empty turn costs two bytes on
# the wire, so without a count limit a 64 MB request would be 32 million turns.
MAX_TURNS = 65536
# The response carries every warning: beyond this many, one line says how many more there were.
MAX_WARNINGS = 100
# A speaker number is one digit in range; longer digit strings are refused without converting them to int
# (Python refuses to convert more than 4300 digits at all).
_MAX_SPEAKER_DIGITS = 6
_TURN = re.compile(r"^Speaker\s+(\d+)\s*:\s*(.*)$", re.IGNORECASE)


class ScriptError(ValueError):
    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


@dataclass
class Turn:
    speaker: int  # as written in the script
    text: str


@dataclass
class ParsedScript:
    turns: list[Turn]
    shift: int  # script number - shift = model speaker index
    warnings: list[str] = field(default_factory=list)

    @property
    def speakers(self) -> list[int]:
        return sorted({t.speaker for t in self.turns})

    def model_speaker(self, speaker: int) -> int:
        return speaker - self.shift


def _finish(turns: list[Turn], warnings: list[str], field_name: str) -> ParsedScript:
    if not turns:
        raise ScriptError(
            field_name,
            "no line in the form 'Speaker N: text' (for one narrator, start each paragraph with 'Speaker 1: ')",
        )
    speakers = sorted({t.speaker for t in turns})
    if len(speakers) > MAX_SPEAKERS:
        raise ScriptError(
            field_name, f"{len(speakers)} speakers ({', '.join(map(str, speakers))}); at most {MAX_SPEAKERS}"
        )
    shift = 1 if speakers[0] > 0 else 0
    if speakers[-1] - shift >= MAX_SPEAKERS:
        raise ScriptError(field_name, _out_of_range(str(speakers[-1])))
    return ParsedScript(turns=turns, shift=shift, warnings=_capped(warnings))


def _out_of_range(speaker: str) -> str:
    return f"speaker {speaker} is out of range: speakers are numbered 0..3 or 1..4"


def _capped(warnings: list[str]) -> list[str]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    return [*warnings[:MAX_WARNINGS], f"... and {len(warnings) - MAX_WARNINGS} more lines skipped"]


def _speaker_number(digits: str, field_name: str) -> int:
    if len(digits.lstrip("0")) > _MAX_SPEAKER_DIGITS:
        shown = digits if len(digits) <= 20 else f"{digits[:8]}...({len(digits)} digits)"
        raise ScriptError(field_name, _out_of_range(shown))
    return int(digits)


def check_turn_count(count: int) -> None:
    """Before the turns are copied out of the request: their number alone can be too large."""
    if count > MAX_TURNS:
        raise ScriptError("turns", f"{count} turns; at most {MAX_TURNS}")


def parse_text(text: str) -> ParsedScript:
    if len(text.encode()) > MAX_SCRIPT_BYTES:
        raise ScriptError("text", f"script is {len(text.encode())} bytes; the limit is {MAX_SCRIPT_BYTES}")
    text = text.removeprefix("\ufeff")  # str.strip() keeps it: a mark alone would pass for a script
    if not text.strip():
        raise ScriptError("text", "script is empty")
    turns: list[Turn] = []
    warnings: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        match = _TURN.match(line)
        if match is None:
            warnings.append(f"line {number}: not in the form 'Speaker N: text'; skipped")
            continue
        speech = match.group(2).strip()
        if not speech:
            warnings.append(f"line {number}: speaker {match.group(1)} has no text; skipped")
            continue
        turns.append(Turn(_speaker_number(match.group(1), "text"), speech))
    return _finish(turns, warnings, "text")


def parse_turns(turns: list[tuple[int, str]]) -> ParsedScript:
    if not turns:
        raise ScriptError("turns", "script is empty")
    check_turn_count(len(turns))
    total = sum(len(t.encode()) for _, t in turns)
    if total > MAX_SCRIPT_BYTES:
        raise ScriptError("turns", f"script is {total} bytes; the limit is {MAX_SCRIPT_BYTES}")
    out: list[Turn] = []
    warnings: list[str] = []
    for i, (speaker, text) in enumerate(turns):
        text = " ".join(text.split())
        if not text:
            warnings.append(f"turns[{i}]: no text; skipped")
            continue
        out.append(Turn(speaker, text))
    if not out:
        raise ScriptError("turns", "every turn is empty")
    return _finish(out, warnings, "turns")

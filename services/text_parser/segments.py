"""Scripts longer than the model's context, split at turn boundaries into segments that each fit.

A segment is generated as a script of its own, in order: the same system prompt, the voices of the speakers who
speak in it, its own turns, and the speech the model makes for them. It fits when its prompt, the frames its
words are expected to take, a margin for slower speech and the turn tokens (services/common/stream_size.py)
stay within the context. The prompt is counted exactly, piece by piece as PromptBuilder.build tokenizes it, with
every voice of the script (a segment's own are never more), so only the speech is an estimate.

A turn is never cut: one that does not fit even alone is refused (TurnTooLong), since a turn split at a sentence
would change the prompt the model reads and the turns the caller gets back. Segments keep the whole script's
speaker numbering (its shift), so each speaker keeps its voice in every segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise

from services.common.stream_size import TURN_TOKENS, expected_branch_positions, expected_frames
from services.text_parser.prompt import PromptBuilder, turn_piece
from services.text_parser.script import ParsedScript, ScriptError, Turn

# A segment still fits when the model speaks its words this much slower than expected.
FRAME_MARGIN_PERCENT = 20


class TurnTooLong(ScriptError):
    """A turn that does not fit the context even in a segment of its own."""

    def __init__(self, field_name: str, reason: str, *, frames: int, frame_room: int) -> None:
        super().__init__(field_name, reason)
        self.frames = frames  # the speech it was priced at, margin included
        self.frame_room = frame_room  # the speech its segment has room for (negative: its text alone is too long)


@dataclass(frozen=True)
class Segment:
    first_turn: int  # the index of its first turn in the whole script
    script: ParsedScript  # its turns, numbered as in the whole script
    prompt_tokens: int  # the ids PromptBuilder.build makes for `script` with the plan's voices, exactly
    frames: int  # the speech it is expected to make (with fixed frames: its share of them)
    margin_frames: int
    positions: int  # prompt, frames, margin and turn tokens: what must fit the context

    @property
    def turns(self) -> list[Turn]:
        return self.script.turns

    @property
    def words(self) -> int:
        return sum(len(t.text.split()) for t in self.turns)


@dataclass(frozen=True)
class _Costs:
    """Prefix sums over the turns, so any run of turns is priced in constant time."""

    fixed: int  # system prompt, voices and markers: every segment's prompt has them
    tokens: list[int]  # tokens[i]: the ids of turns[:i]
    frames: list[int]
    margin_percent: int

    def prompt(self, start: int, end: int) -> int:
        return self.fixed + self.tokens[end] - self.tokens[start]

    def split(self, start: int, end: int) -> tuple[int, int]:
        frames = self.frames[end] - self.frames[start]
        return frames, -(-frames * self.margin_percent // 100)

    def positions(self, start: int, end: int) -> int:
        frames, margin = self.split(start, end)
        return expected_branch_positions(self.prompt(start, end), frames + margin)[0]


def _frames_per_turn(turns: Sequence[Turn], fixed_frames: int | None) -> list[int]:
    words = [len(t.text.split()) for t in turns]
    if fixed_frames is None:
        return [expected_frames(w) for w in words]
    # Fixed frames are shared out by words, in whole frames that add up to the total.
    total = sum(words)
    shares = [fixed_frames * w // total for w in accumulate(words, initial=0)]
    return [b - a for a, b in pairwise(shares)]


def _costs(
    script: ParsedScript, builder: PromptBuilder, voice_frames: dict[int, int], fixed_frames: int | None, margin: int
) -> _Costs:
    fixed = len(builder.build(dataclasses.replace(script, turns=[]), voice_frames)[0])
    tokens = [builder.count(turn_piece(script, t)) for t in script.turns]
    frames = _frames_per_turn(script.turns, fixed_frames)
    # Fixed frames are what the llm makes, to the frame: no margin for them.
    return _Costs(
        fixed,
        list(accumulate(tokens, initial=0)),
        list(accumulate(frames, initial=0)),
        margin if fixed_frames is None else 0,
    )


def _check_fits(script: ParsedScript, costs: _Costs, max_context: int, field_name: str) -> None:
    """Every turn fits a segment of its own, or the error says which does not and why."""
    alone = expected_branch_positions(costs.fixed, 0)[0]
    if alone >= max_context:
        raise ScriptError(
            "voices",
            f"the system prompt and voice prompts take {costs.fixed} tokens, {alone} positions with the turn tokens; "
            f"the context holds {max_context}",
        )
    for i, turn in enumerate(script.turns):
        need = costs.positions(i, i + 1)
        if need > max_context:
            frames, margin = costs.split(i, i + 1)
            raise TurnTooLong(
                field_name,
                f"turn {i + 1} (speaker {turn.speaker}, {len(turn.text.split())} words) needs {need} positions "
                f"({costs.prompt(i, i + 1)} prompt tokens with the system prompt and voices, {frames} expected frames, "
                f"{margin} frames of margin, {TURN_TOKENS} turn tokens); the context holds {max_context}: "
                "split it into shorter turns",
                frames=frames + margin,
                frame_room=max_context - (need - frames - margin),
            )


def _greedy(costs: _Costs, turns: int, cap: int) -> list[tuple[int, int]]:
    """The fewest runs of turns within `cap` positions each, filled in order (every turn alone fits the cap)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for end in range(2, turns + 1):
        if costs.positions(start, end) > cap:
            runs.append((start, end - 1))
            start = end - 1
    runs.append((start, turns))
    return runs


def plan_segments(
    script: ParsedScript,
    builder: PromptBuilder,
    voice_frames: dict[int, int],
    max_context: int,
    *,
    fixed_frames: int | None = None,
    margin_percent: int = FRAME_MARGIN_PERCENT,
    field_name: str = "text",
) -> list[Segment]:
    """The script in as few segments as fit `max_context` positions each, in order, at turn boundaries.

    `voice_frames` maps model speaker -> voice prompt frames, as for PromptBuilder.build: every segment is priced
    with every voice. With `fixed_frames` the job makes exactly that many frames, shared out by words. Of the plans
    with the fewest segments this is one whose largest segment is smallest, so every segment keeps some room.
    Raises TurnTooLong naming the first turn that fits no segment, or ScriptError when the voices alone fill it.
    """
    costs = _costs(script, builder, voice_frames, fixed_frames, margin_percent)
    _check_fits(script, costs, max_context, field_name)
    turns = len(script.turns)
    fewest = len(_greedy(costs, turns, max_context))
    # The smallest cap that needs no more segments than the whole context does (a binary search: a larger cap
    # never needs more segments), so the slack is shared rather than left to the last segment.
    low, high = max(costs.positions(i, i + 1) for i in range(turns)), max_context
    while low < high:
        cap = (low + high) // 2
        if len(_greedy(costs, turns, cap)) <= fewest:
            high = cap
        else:
            low = cap + 1
    segments = []
    for start, end in _greedy(costs, turns, high):
        frames, margin = costs.split(start, end)
        segments.append(
            Segment(
                first_turn=start,
                script=dataclasses.replace(script, turns=script.turns[start:end], warnings=[]),
                prompt_tokens=costs.prompt(start, end),
                frames=frames,
                margin_frames=margin,
                positions=costs.positions(start, end),
            )
        )
    return segments

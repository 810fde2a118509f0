"""The reference prompt layout (MODEL.md, "Prompt"), tokenized piece by piece with a cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from services.text_parser.script import ParsedScript

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each"
    " respective speaker.\n"
)


@dataclass(frozen=True)
class SpecialTokens:
    audio_bos: int
    audio_eos: int
    audio: int


class PromptBuilder:
    def __init__(self, tokenizer, special: SpecialTokens, cache_size: int = 65536) -> None:
        self.tokenizer = tokenizer
        self.special = special
        # Scripts repeat their speaker prefixes and often whole lines; each piece is tokenized once.
        self._encode = lru_cache(maxsize=cache_size)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def build(self, script: ParsedScript, voice_frames: dict[int, int]) -> tuple[list[int], list[int]]:
        """Prompt ids, and the model speakers whose voices appear in it, in prompt order.

        `voice_frames` maps model speaker index -> number of audio frames of that speaker's voice prompt.
        """
        ids = list(self._encode(SYSTEM_PROMPT))
        order = sorted(voice_frames)
        if order:
            ids += self._encode(" Voice input:\n")
            for k in order:
                ids += self._encode(f" Speaker {k}:")
                ids += [self.special.audio_bos] + [self.special.audio] * voice_frames[k] + [self.special.audio_eos]
                ids += self._encode("\n")
        ids += self._encode(" Text input:\n")
        for turn in script.turns:
            ids += self._encode(f" Speaker {script.model_speaker(turn.speaker)}: {turn.text}\n")
        ids += self._encode(" Speech output:\n")
        ids.append(self.special.audio_bos)
        return ids, order

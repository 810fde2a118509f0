"""The reference prompt layout (MODEL.md, "Prompt"), tokenized piece by piece with a cache."""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

from services.common.errors import CheckpointError
from services.text_parser.script import ParsedScript, Turn

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each"
    " respective speaker.\n"
)
# What the token cache may hold, counted as the bytes of its keys and values: a busy parser keeps the pieces
# scripts repeat (speaker prefixes, common lines) without growing with every distinct script it sees. 16 MiB
# is about 400,000 tokens of pieces, a few hundred scripts' worth, and a small share of the parser's memory.
TOKEN_CACHE_BYTES = 16 * 1024 * 1024


def turn_piece(script: ParsedScript, turn: Turn) -> str:
    """One turn as the prompt writes it: a piece of its own, so a prompt's length is the sum of its pieces'."""
    return f" Speaker {script.model_speaker(turn.speaker)}: {turn.text}\n"


@dataclass(frozen=True)
class SpecialTokens:
    audio_bos: int
    audio_eos: int
    audio: int


class TokenCache:
    """Least-recently-used text piece -> token ids, bounded by the bytes of what it holds.

    Thread-safe: Parse runs in worker threads.
    """

    # An OrderedDict entry (its node and hash slot) and the tuple's header, roughly.
    ENTRY_OVERHEAD = 160

    def __init__(self, budget_bytes: int = TOKEN_CACHE_BYTES, max_entry_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        # A piece bigger than a sixteenth of the budget would push out much of the cache to be kept once.
        self.max_entry_bytes = budget_bytes // 16 if max_entry_bytes is None else max_entry_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def cost(cls, text: str, ids: tuple[int, ...]) -> int:
        # Token ids are kept as a tuple of ints: 8 bytes of pointer and (above 256) a 28-byte int each.
        return sys.getsizeof(text) + 36 * len(ids) + cls.ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get(text)
            if ids is not None:
                self._entries.move_to_end(text)
            return ids

    def put(self, text: str, ids: tuple[int, ...]) -> None:
        cost = self.cost(text, ids)
        if cost > self.max_entry_bytes:
            return
        with self._lock:
            if text in self._entries:
                self._entries.move_to_end(text)
                return
            self._entries[text] = ids
            self.bytes += cost
            while self.bytes > self.budget:
                old_text, old_ids = self._entries.popitem(last=False)
                self.bytes -= self.cost(old_text, old_ids)


# A line any tokenizer of the model's family turns into several ids.
TOKENIZER_PROBE = "Speaker 1: Hello there."


class PromptBuilder:
    def __init__(self, tokenizer, special: SpecialTokens, cache_bytes: int = TOKEN_CACHE_BYTES) -> None:
        self.tokenizer = tokenizer
        self.special = special
        # Scripts repeat their speaker prefixes and often whole lines; each piece is tokenized once.
        self.cache = TokenCache(cache_bytes)

    @classmethod
    def from_pretrained(cls, tokenizer_dir: str | os.PathLike, config) -> PromptBuilder:
        """The builder for a checkpoint: its tokenizer files and the special token ids of its VibeVoiceConfig."""
        from transformers import AutoTokenizer

        special = SpecialTokens(config.audio_bos_token_id, config.audio_eos_token_id, config.audio_token_id)
        builder = cls(AutoTokenizer.from_pretrained(tokenizer_dir), special)
        builder.check(tokenizer_dir, config.text_config.vocab_size)
        return builder

    def check(self, tokenizer_dir: str | os.PathLike, vocab_size: int) -> None:
        """Refuse a tokenizer that cannot make this model's prompts. transformers builds a Qwen2 tokenizer even
        from a directory without its files, with a vocabulary of one that turns any text into no ids at all."""
        probe = self._tokenize(TOKENIZER_PROBE)
        if not probe:
            raise CheckpointError(
                f"{tokenizer_dir}: the tokenizer makes no ids of {TOKENIZER_PROBE!r}; the checkpoint needs its "
                "tokenizer files (tokenizer.json and tokenizer_config.json, or vocab.json and merges.txt)"
            )
        special = self.special
        largest = max(*probe, special.audio_bos, special.audio_eos, special.audio)
        if largest >= vocab_size:
            raise CheckpointError(
                f"{tokenizer_dir}: token id {largest} (of {TOKENIZER_PROBE!r} or the audio tokens) is outside the "
                f"model's vocabulary of {vocab_size} (text_config.vocab_size)"
            )

    def _tokenize(self, text: str) -> tuple[int, ...]:
        # Control tokens a script contains ("<|endoftext|>", "<|vision_pad|>", ...) are text to speak, never
        # special tokens: the layout's own special ids are added by id, not through the tokenizer.
        return tuple(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def count(self, text: str) -> int:
        """The ids one piece of the layout takes in a prompt."""
        ids = self.cache.get(text)
        if ids is None:
            ids = self._tokenize(text)
            self.cache.put(text, ids)
        return len(ids)

    def build(
        self, script: ParsedScript, voice_frames: dict[int, int], limit: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Prompt ids, and the model speakers whose voices appear in it, in prompt order.

        `voice_frames` maps model speaker index -> number of audio frames of that speaker's voice prompt.
        The pieces tokenized for this prompt are cached only if it has at most `limit` ids: a prompt that will
        be refused does not push useful pieces out.
        """
        fresh: dict[str, tuple[int, ...]] = {}

        def encode(text: str) -> tuple[int, ...]:
            ids = fresh.get(text)
            if ids is None:
                ids = self.cache.get(text)
            if ids is None:
                ids = fresh[text] = self._tokenize(text)
            return ids

        ids = list(encode(SYSTEM_PROMPT))
        order = sorted(voice_frames)
        if order:
            ids += encode(" Voice input:\n")
            for k in order:
                ids += encode(f" Speaker {k}:")
                ids += [self.special.audio_bos] + [self.special.audio] * voice_frames[k] + [self.special.audio_eos]
                ids += encode("\n")
        ids += encode(" Text input:\n")
        for turn in script.turns:
            ids += encode(turn_piece(script, turn))
        ids += encode(" Speech output:\n")
        ids.append(self.special.audio_bos)
        if limit is None or len(ids) <= limit:
            for text, piece in fresh.items():
                self.cache.put(text, piece)
        return ids, order

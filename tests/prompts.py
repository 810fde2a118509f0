"""The reference's prompt layout, written out independently of the text_parser service, for tests."""

from __future__ import annotations

SYSTEM = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each"
    " respective speaker.\n"
)


def reference_prompt(tokenizer, config, script: str, voice_frames: list[int]) -> list[int]:
    """MODEL.md's prompt layout for a script and the frame counts of its voices (in speaker order)."""

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    ids = tok(SYSTEM)
    if voice_frames:
        ids += tok(" Voice input:\n")
        for k, n in enumerate(voice_frames):
            ids += tok(f" Speaker {k}:") + [config.audio_bos_token_id] + [config.audio_token_id] * n
            ids += [config.audio_eos_token_id] + tok("\n")
    ids += tok(" Text input:\n")
    for line in script.splitlines():
        if line.strip():
            speaker, text = line.split(":", 1)
            ids += tok(f" Speaker {int(speaker.split()[1]) - 1}: {text.strip()}\n")
    return ids + tok(" Speech output:\n") + [config.audio_bos_token_id]

"""transformers' own `VibeVoiceForConditionalGeneration.generate()`, the correctness oracle, driven honestly.

The reference is called only through its public arguments: the prompt ids, the voice audio through
transformers' own feature extractor, a seed for the global RNG, `guidance_scale`, `num_diffusion_steps`,
`max_new_tokens`, and only to mirror the mesh's `fixed_frames` test option, a logits processor that forces the
same token decisions. Without `fixed_frames` the model decides, exactly as a user's `generate()` call does.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList


class ForceFrames(LogitsProcessor):
    """Choose the speech token for the first `frames` steps and end-of-sequence after them."""

    def __init__(self, prompt_length: int, frames: int, audio_token_id: int, eos_token_id: int) -> None:
        self.prompt_length = prompt_length
        self.frames = frames
        self.audio_token_id = audio_token_id
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.audio_token_id if step < self.frames else self.eos_token_id] = 0.0
        return forced


def load_reference(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import VibeVoiceForConditionalGeneration

    return VibeVoiceForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()


def reference_generate(
    model,
    prompt_ids: list[int],
    voices: list[np.ndarray],
    seed: int,
    fixed_frames: int | None = None,
    cfg_scale: float = 1.3,
    diffusion_steps: int = 10,
    max_new_tokens: int | None = 200,
) -> tuple[np.ndarray, list[int]]:
    """The reference's audio and generated token ids for one request.

    voices: decoded 24 kHz mono, in prompt order, not normalized. `max_new_tokens` None: not passed, so the
    checkpoint's generation config decides. With `fixed_frames` the decisions are forced as the mesh's option
    forces them; otherwise the model chooses every token.
    """
    from transformers.models.vibevoice_acoustic_tokenizer import VibeVoiceAcousticTokenizerFeatureExtractor

    cfg = model.config
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = {}
    if voices:
        features = VibeVoiceAcousticTokenizerFeatureExtractor()(voices, sampling_rate=24000)
        kwargs = {
            "input_values": features["input_values"].to(device, model.dtype),
            "padding_mask": features["padding_mask"].to(device),
        }
    if fixed_frames is not None:
        max_new_tokens = fixed_frames + 1
        kwargs["logits_processor"] = LogitsProcessorList(
            [ForceFrames(len(prompt_ids), fixed_frames, cfg.audio_token_id, cfg.eos_token_id)]
        )
    if max_new_tokens is not None:  # passed as None it would override the generation config's with no limit
        kwargs["max_new_tokens"] = max_new_tokens
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        guidance_scale=cfg_scale,
        num_diffusion_steps=diffusion_steps,
        return_dict_in_generate=True,
        **kwargs,
    )
    audio = out.audio[0]
    samples = np.zeros(0, np.float32) if audio is None else audio.reshape(-1).float().cpu().numpy()
    return samples, out.sequences[0, len(prompt_ids) :].tolist()


def reference_audio(
    model,
    prompt_ids: list[int],
    voices: list[np.ndarray],
    seed: int,
    fixed_frames: int,
    cfg_scale: float = 1.3,
    diffusion_steps: int = 10,
) -> np.ndarray:
    """The reference's audio for one request with forced decisions (`fixed_frames`)."""
    return reference_generate(model, prompt_ids, voices, seed, fixed_frames, cfg_scale, diffusion_steps)[0]

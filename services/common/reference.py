"""transformers' own `VibeVoiceForConditionalGeneration.generate()`, the correctness oracle, driven honestly.

The reference is called only through its public arguments: the prompt ids, the voice audio through
transformers' own feature extractor, a seed for the global RNG, `guidance_scale`, `num_diffusion_steps`, and,
for random-weight models, a logits processor that forces the same token decisions as `fixed_frames`.
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


def reference_audio(
    model,
    prompt_ids: list[int],
    voices: list[np.ndarray],
    seed: int,
    fixed_frames: int,
    cfg_scale: float = 1.3,
    diffusion_steps: int = 10,
) -> np.ndarray:
    """The reference's audio for one request (voices: decoded 24 kHz mono, in prompt order, not normalized)."""
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
    torch.manual_seed(seed)
    audio = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=fixed_frames + 1,
        guidance_scale=cfg_scale,
        num_diffusion_steps=diffusion_steps,
        logits_processor=LogitsProcessorList(
            [ForceFrames(len(prompt_ids), fixed_frames, cfg.audio_token_id, cfg.eos_token_id)]
        ),
        **kwargs,
    )
    return audio[0].reshape(-1).float().cpu().numpy()

"""A voice prompt's loudness normalisation, as the reference's feature extractor does it.

The gateway and the jobs service decode voice files (`services/common/audio.py`) and send the samples as decoded;
the acoustic service normalises them here before its encoder reads them, so the services that only relay audio
never import torch. A voice's cache key (`voice_digest`) is taken over the decoded samples, before this.
"""

from __future__ import annotations

import torch

TARGET_DBFS = -25  # the feature extractor's default, an int there too
NORM_EPS = 1e-6


def normalize_voice(samples: torch.Tensor) -> torch.Tensor:
    """-25 dBFS RMS, then divided by the peak if above 1: a new float32 tensor.

    The same float32 torch ops in the same order as transformers' VibeVoiceAcousticTokenizerFeatureExtractor,
    so the result is bit-identical to what the reference feeds its acoustic tokenizer.
    """
    x = samples.to(torch.float32, copy=True)
    rms = torch.sqrt(torch.mean(x**2))
    x *= 10 ** (TARGET_DBFS / 20) / (rms + NORM_EPS)
    peak = torch.max(torch.abs(x))
    if peak > 1.0:
        x = x / (peak + NORM_EPS)
    return x

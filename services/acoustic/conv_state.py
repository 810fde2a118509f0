"""Per-stream streaming-convolution state for the sigma-VAE decoder and the semantic encoder.

transformers' `VibeVoiceAcousticTokenizerConv1dPaddingCache` holds one batch tensor per convolution layer. A
stream owns one row of that state for its whole life; each step gathers the rows of the streams that speak in
it into a batch cache, runs the model, and writes the rows back, so a stream's state never depends on which
other streams share its batch.
"""

from __future__ import annotations

import torch
from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
    VibeVoiceAcousticTokenizerConv1dCacheLayer,
    VibeVoiceAcousticTokenizerConv1dPaddingCache,
)


class ConvStateStore:
    def __init__(self, shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype) -> None:
        # layer key -> (channels, left padding), discovered once by running the model on one frame
        self.shapes = shapes
        self.device = device
        self.dtype = dtype
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def discover(cls, run_one_frame, device: torch.device, dtype: torch.dtype) -> ConvStateStore:
        cache = VibeVoiceAcousticTokenizerConv1dPaddingCache()
        run_one_frame(cache)
        shapes = {key: (layer.in_channels, layer.left_pad) for key, layer in cache.layers.items()}
        return cls(shapes, device, dtype)

    def add(self, stream_id: int) -> None:
        self.states[stream_id] = {
            key: torch.zeros(1, c, pad, device=self.device, dtype=self.dtype) for key, (c, pad) in self.shapes.items()
        }

    def remove(self, stream_id: int) -> None:
        self.states.pop(stream_id, None)

    def gather(self, stream_ids: list[int]) -> VibeVoiceAcousticTokenizerConv1dPaddingCache:
        cache = VibeVoiceAcousticTokenizerConv1dPaddingCache()
        for key, (channels, pad) in self.shapes.items():
            layer = VibeVoiceAcousticTokenizerConv1dCacheLayer()
            layer.cache = torch.cat([self.states[s][key] for s in stream_ids], dim=0)
            layer.left_pad = pad
            layer.in_channels = channels
            layer.is_initialized = True
            cache.layers[key] = layer
        return cache

    def scatter(self, stream_ids: list[int], cache: VibeVoiceAcousticTokenizerConv1dPaddingCache) -> None:
        for key, layer in cache.layers.items():
            for row, s in enumerate(stream_ids):
                self.states[s][key] = layer.cache[row : row + 1]

    def bytes_per_stream(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(c * pad * item for c, pad in self.shapes.values())

"""Per-stream streaming-convolution state for the sigma-VAE decoder and the semantic encoder.

transformers' `VibeVoiceAcousticTokenizerConv1dPaddingCache` holds one batch tensor per convolution layer.
Here every layer's state is one tensor with a row per stream, allocated once for the most streams the
service takes; streams stay packed at the front (the last one moves into a freed row), so a step over the
first n streams hands the model views of rows [0, n) and the model updates them in place. A step over any
other set of streams gathers its rows and writes them back. Either way a stream's state never depends on
which other streams share its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
    VibeVoiceAcousticTokenizerConv1dCacheLayer,
    VibeVoiceAcousticTokenizerConv1dPaddingCache,
)


class ConvStateRows:
    def __init__(self, shapes: dict[str, tuple[int, int]], rows: int, device, dtype: torch.dtype) -> None:
        # layer key -> (channels, left padding), as the model's streaming layers define them
        self.shapes = shapes
        self.state = {k: torch.zeros(rows, c, pad, device=device, dtype=dtype) for k, (c, pad) in shapes.items()}

    @classmethod
    def discover(cls, run_one_frame: Callable, rows: int, device, dtype: torch.dtype) -> ConvStateRows:
        cache = VibeVoiceAcousticTokenizerConv1dPaddingCache()
        run_one_frame(cache)
        shapes = {key: (layer.in_channels, layer.left_pad) for key, layer in cache.layers.items()}
        return cls(shapes, rows, device, dtype)

    def bytes_per_row(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.state.values())

    def reset(self, row: int) -> None:
        for t in self.state.values():
            t[row].zero_()

    def move(self, src: int, dst: int) -> None:
        for t in self.state.values():
            t[dst] = t[src]

    def exchange(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Swap rows a[i] and b[i] for every i, one gather per layer (the rows are distinct)."""
        src, dst = torch.cat([b, a]), torch.cat([a, b])
        for t in self.state.values():
            t[dst] = t[src]

    def snapshot(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {k: t[lo:hi].clone() for k, t in self.state.items()}

    def restore(self, lo: int, saved: dict[str, torch.Tensor]) -> None:
        for k, rows in saved.items():
            self.state[k][lo : lo + rows.shape[0]] = rows

    def _cache(self, tensors: dict[str, torch.Tensor]) -> VibeVoiceAcousticTokenizerConv1dPaddingCache:
        cache = VibeVoiceAcousticTokenizerConv1dPaddingCache()
        for key, (channels, pad) in self.shapes.items():
            layer = VibeVoiceAcousticTokenizerConv1dCacheLayer()
            layer.cache, layer.left_pad, layer.in_channels, layer.is_initialized = tensors[key], pad, channels, True
            cache.layers[key] = layer
        return cache

    def leading(self, n: int) -> VibeVoiceAcousticTokenizerConv1dPaddingCache:
        """A cache over rows [0, n) that the model updates in place."""
        return self._cache({k: t[:n] for k, t in self.state.items()})

    def gather(self, rows: torch.Tensor) -> VibeVoiceAcousticTokenizerConv1dPaddingCache:
        return self._cache({k: t.index_select(0, rows) for k, t in self.state.items()})

    def scatter(self, rows: torch.Tensor, cache: VibeVoiceAcousticTokenizerConv1dPaddingCache) -> None:
        for key, layer in cache.layers.items():
            self.state[key].index_copy_(0, rows, layer.cache)

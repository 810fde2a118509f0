"""How many past frames a streaming convolution stack's state depends on, read off the stack itself.

Every causal convolution keeps its last `left_pad` inputs as state. At a layer that takes `r` inputs per frame
those span ceil(left_pad / r) frames of its input, and each of those inputs reaches back as far as the layers
before it do. The sum over the layers therefore bounds how far back the whole state after a frame reaches:
replaying that many frames from a fresh state rebuilds it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
    VibeVoiceAcousticTokenizerConv1dPaddingCache,
)


class _InputCountingCache(VibeVoiceAcousticTokenizerConv1dPaddingCache):
    """The model's padding cache, noting how many inputs each layer took."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, int] = {}

    def update(self, hidden_states, cache_key, conv_module):
        self.inputs[cache_key] = hidden_states.shape[-1]
        return super().update(hidden_states, cache_key, conv_module)


def state_frames(run_one_frame: Callable[[VibeVoiceAcousticTokenizerConv1dPaddingCache], None]) -> int:
    """The frames of input the state after a frame depends on, from one frame run through a fresh cache."""
    cache = _InputCountingCache()
    run_one_frame(cache)
    return sum(-(-layer.left_pad // cache.inputs[key]) for key, layer in cache.layers.items())

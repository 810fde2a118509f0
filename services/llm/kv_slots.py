"""Static KV storage for the three branches of every stream, planned once at start-up.

transformers' `generate()` runs three language-model branches per stream (see `services/llm/engine.py`):
the positive branch over the prompt and everything generated, the speech-CFG negative branch (the speech
steps of the current segment), and the token-CFG unconditional branch (the generated token ids only). Per
layer one tensor of shape (BRANCHES * slots, kv_heads, max_len, head_dim) holds them: row 3s + POSITIVE,
3s + NEGATIVE and 3s + UNCONDITIONAL are stream s's, so the decode step of the first n streams reads rows
[0, 3n) as one contiguous batch. Streams stay packed at the front: when one leaves, the last one moves into
its slot. The last position of every row is scratch space where padding rows of a fixed-size batch write
harmlessly.
"""

from __future__ import annotations

import torch

POSITIVE, NEGATIVE, UNCONDITIONAL = 0, 1, 2
BRANCHES = 3


class KVSlots:
    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, slots: int, max_len: int, device, dtype: torch.dtype
    ) -> None:
        self.slots = slots
        self.max_len = max_len
        shape = (BRANCHES * slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]

    @property
    def scratch(self) -> int:
        return self.max_len - 1

    @staticmethod
    def bytes_per_slot(layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return layers * 2 * BRANCHES * kv_heads * max_len * head_dim * item  # K and V of every branch

    def move(self, src: int, dst: int) -> None:
        b = BRANCHES
        for t in (*self.k, *self.v):
            t[b * dst : b * dst + b] = t[b * src : b * src + b]

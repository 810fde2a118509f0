"""Static KV storage for both CFG branches of every stream, planned once at start-up.

Per layer one tensor of shape (2 * slots, kv_heads, max_len, head_dim): row 2s holds stream s's positive
branch and row 2s + 1 its negative branch, so the decode step of the first n streams reads rows [0, 2n) as
one contiguous batch. Streams stay packed at the front: when one leaves, the last one moves into its slot.
The last position of every row is scratch space where padding rows of a fixed-size batch write harmlessly.
"""

from __future__ import annotations

import torch


class KVSlots:
    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, slots: int, max_len: int, device, dtype: torch.dtype
    ) -> None:
        self.slots = slots
        self.max_len = max_len
        shape = (2 * slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]

    @property
    def scratch(self) -> int:
        return self.max_len - 1

    @staticmethod
    def bytes_per_slot(layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return layers * 2 * 2 * kv_heads * max_len * head_dim * item  # K and V, two branches

    def move(self, src: int, dst: int) -> None:
        for t in (*self.k, *self.v):
            t[2 * dst : 2 * dst + 2] = t[2 * src : 2 * src + 2]

"""The Qwen2.5 forward over static KV slots, batched across streams at different positions.

transformers' Qwen2Model keeps one position per batch, so streams at different points of their scripts
cannot share its forward. This runs the same modules (the checkpoint's own Qwen2 layers, rotary embedding
and norms) with per-row positions: each row writes its new keys and values at its own position and attends
to everything before it. Shapes depend only on (rows, tokens), so a decode step can be captured as a CUDA
graph per batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from services.llm.kv_slots import KVSlots


class SlotDecoder:
    def __init__(self, lm, kv: KVSlots) -> None:
        if getattr(lm.config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        self.lm = lm
        self.kv = kv
        attn = lm.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling

    def forward(self, x: torch.Tensor, first_row: int, positions: torch.Tensor, keys: int) -> torch.Tensor:
        """x: (R, T, hidden) inputs of KV rows [first_row, first_row + R) at `positions` (R, T).

        Attends over the first `keys` positions of each row. Returns the final-norm hidden states (R, T, hidden).
        """
        rows, tokens = x.shape[:2]
        cos, sin = self.lm.rotary_emb(x, positions)
        visible = torch.arange(keys, device=x.device)[None, None, None, :] <= positions[:, None, :, None]
        row_index = torch.arange(first_row, first_row + rows, device=x.device)[:, None].expand(rows, tokens)
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, tokens, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, tokens, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, tokens, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache_k, cache_v = self.kv.k[i], self.kv.v[i]
            cache_k[row_index, :, positions] = k.transpose(1, 2)
            cache_v[row_index, :, positions] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q,
                cache_k[first_row : first_row + rows, :, :keys],
                cache_v[first_row : first_row + rows, :, :keys],
                attn_mask=visible,
                scale=self.scaling,
                enable_gqa=True,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, tokens, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.norm(x)

"""The Qwen2.5 forward over static KV slots, batched across streams at different positions.

transformers' Qwen2Model keeps one position per batch, so streams at different points of their scripts
cannot share its forward. This runs the same modules (the checkpoint's own Qwen2 layers, rotary embedding
and norms) with per-row positions: each row writes its new keys and values at its own position and attends
to everything before it. Shapes depend only on (rows, tokens), so a decode step can be captured as a CUDA
graph per batch size.

The q/k/v projections and the MLP's gate/up projections of each layer run as one matmul each
(`fuse_linears`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from services.common.cuda_graphs import compiled
from services.common.fused_linear import fuse_linears
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
        self.compiled_layer = self.layer
        self.q_size = attn.q_proj.out_features
        self.kv_size = attn.k_proj.out_features
        self.qkv = [fuse_linears([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj]) for la in lm.layers]
        self.gate_up = [fuse_linears([la.mlp.gate_proj, la.mlp.up_proj])[0] for la in lm.layers]

    def compile(self) -> None:
        self.compiled_layer = compiled(self.layer)

    def forward(
        self, x: torch.Tensor, first_row: int, positions: torch.Tensor, keys: int, compiled: bool = False
    ) -> torch.Tensor:
        """x: (R, T, hidden) inputs of KV rows [first_row, first_row + R) at `positions` (R, T).

        Attends over the first `keys` positions of each row. Returns the final-norm hidden states (R, T, hidden).
        `compiled` runs the layers through `compiled_layer` (the decode step's graphs; prefill stays eager, its
        shapes change with every chunk).
        """
        rows, tokens = x.shape[:2]
        cos, sin = self.lm.rotary_emb(x, positions)
        visible = torch.arange(keys, device=x.device)[None, None, None, :] <= positions[:, None, :, None]
        row_index = torch.arange(first_row, first_row + rows, device=x.device)[:, None].expand(rows, tokens)
        step = self.compiled_layer if compiled else self.layer
        for i, layer in enumerate(self.lm.layers):
            cache_k = self.kv.k[i][first_row : first_row + rows]
            cache_v = self.kv.v[i][first_row : first_row + rows]
            weights = (*self.qkv[i], self.gate_up[i])
            x = step(layer, weights, x, cos, sin, positions, row_index - first_row, visible, cache_k, cache_v, keys)
        return self.lm.norm(x)

    def layer(self, layer, weights, x, cos, sin, positions, rows, visible, cache_k, cache_v, keys: int) -> torch.Tensor:
        """One Qwen2 decoder layer: writes this step's keys and values at `positions` of its rows, attends to the
        first `keys` positions. No per-layer constants, so one compilation serves all layers."""
        batch, tokens = x.shape[:2]
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight, qkv_bias, gate_up_weight = weights
        h = layer.input_layernorm(x)
        q, k, v = F.linear(h, qkv_weight, qkv_bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache_k[rows, :, positions] = k.transpose(1, 2)
        cache_v[rows, :, positions] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q,
            cache_k[:, :, :keys],
            cache_v[:, :, :keys],
            attn_mask=visible,
            scale=self.scaling,
            enable_gqa=True,
        )
        x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
        gate, up = F.linear(layer.post_attention_layernorm(x), gate_up_weight).chunk(2, dim=-1)
        return x + mlp.down_proj(mlp.act_fn(gate) * up)

"""The Qwen2.5 forward over paged KV, batched across streams at different positions.

transformers' Qwen2Model keeps one position per batch, so streams at different points of their scripts
cannot share its forward. This runs the same modules (the checkpoint's own Qwen2 layers, rotary embedding
and norms) with per-row positions: each row writes its new keys and values at its own position (through its
page table) and attends to everything before it. Shapes depend only on (rows, tokens), so a decode step can
be captured as a CUDA graph per batch size.

The q/k/v projections and the MLP's gate/up projections of each layer run as one matmul each
(`fuse_linears`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from services.common.cuda_graphs import compiled
from services.common.fused_linear import fuse_linears
from services.llm.block_manager import SCRATCH_PAGE
from services.llm.paged_attention import paged_decode, paged_prefill
from services.llm.paged_kv import PagedKV, causal_visibility, gathered
from services.llm.paged_kv import prompt_chunk as prompt_chunk_attention

MLP_TOKENS = 512  # a prompt piece's MLP, this many tokens at a time (`PagedDecoder.after_attention`)


class PagedDecoder:
    def __init__(self, lm, kv: PagedKV) -> None:
        if getattr(lm.config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        self.lm = lm
        self.kv = kv
        attn = lm.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.q_size = attn.q_proj.out_features
        self.kv_size = attn.k_proj.out_features
        self.qkv = [fuse_linears([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj]) for la in lm.layers]
        self.gate_up = [fuse_linears([la.mlp.gate_proj, la.mlp.up_proj])[0] for la in lm.layers]
        self.compiled_parts = (self.before_attention, self.after_attention)

    def compile(self) -> None:
        # Attention and the KV writes stay outside these regions: the kernel is Triton already, and a compiled
        # write into the pool (a graph input) would copy the pool.
        self.compiled_parts = (compiled(self.before_attention), compiled(self.after_attention))

    def forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        keys: int | None = None,
        compiled: bool = False,
        writes: torch.Tensor | None = None,
        prompt_chunk: bool = False,
    ) -> torch.Tensor:
        """x: (R, T, hidden) inputs of KV rows `rows` (R,) at `positions` (R, T).

        Each query attends to its row's positions up to its own. With `keys` the rows' first `keys` positions
        are gathered (plain PyTorch); without, the Triton kernels read only the pages a row holds: `paged_decode`
        for one query per row, `paged_prefill` for a chunk of one row's prompt (R = 1). `prompt_chunk`: one row
        whose positions are the last T of its first `keys` (a chunk of its prompt), attended with an implicit
        lower-right causal mask. Returns the final-norm hidden states (R, T, hidden). `compiled` runs the layers'
        other parts through `compiled_parts` (the decode step's graphs). `writes` (R,) or (R, T) bool: the rows,
        or the positions, whose keys and values are kept; the others write to the scratch page.
        """
        cos, sin, write = self.layer_inputs(x, rows, positions, writes)
        if keys is None and x.shape[1] == 1:
            table, lengths = self.kv.page_table[rows], (positions[:, 0] + 1).to(torch.int32)

            def attend(q, k_pool, v_pool):
                return paged_decode(q, k_pool, v_pool, table, lengths, self.scaling, self.kv.page_size)

        elif keys is None:  # a chunk of one row's prompt, read through its page table
            table = self.kv.page_table[rows][0]  # a gather: a 0-dim index would read it on the host

            def attend(q, k_pool, v_pool):
                return paged_prefill(q, k_pool, v_pool, table, positions[0], self.scaling, self.kv.page_size)

        elif prompt_chunk:
            attend = self.prompt_chunk_attention(rows, keys)

        else:
            gather, visible = self.kv.gather_index(rows, keys), causal_visibility(keys, positions)

            def attend(q, k_pool, v_pool):
                return gathered(q, k_pool, v_pool, gather, visible, self.scaling)

        parts = self.compiled_parts if compiled else None
        for i in range(len(self.lm.layers)):
            q = self.enter(i, x, cos, sin, write, parts)
            out = attend(q, self.kv.k[i], self.kv.v[i])
            x = self.leave(i, x, out, parts)
        return self.lm.norm(x)

    def layer_inputs(
        self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, writes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every layer reads besides its input: the rotary embedding's (cos, sin) at `positions`, and the
        pool index each position's keys and values go to (the scratch page where `writes` is False)."""
        cos, sin = self.lm.rotary_emb(x, positions)
        write = self.kv.pool_index(rows, positions)
        if writes is not None:
            keep = writes if writes.dim() == 2 else writes[:, None]
            write = torch.where(keep, write, SCRATCH_PAGE * self.kv.page_size)
        return cos, sin, write

    def enter(self, i: int, x, cos, sin, write, parts=None) -> torch.Tensor:
        """Layer `i` up to its attention: writes its keys and values, returns its queries. `parts`: the
        (before, after) attention functions to run (default: eager)."""
        before = parts[0] if parts else self.before_attention
        q, k, v = before(self.lm.layers[i], self.qkv[i], x, cos, sin)
        # Written outside the compiled regions: a compiled write into the pool (a graph input) would copy it.
        k_pool, v_pool = self.kv.k[i], self.kv.v[i]
        k_pool[0][:, write] = k.transpose(0, 1)
        v_pool[0][:, write] = v.transpose(0, 1)
        return q

    def leave(self, i: int, x, out, parts=None) -> torch.Tensor:
        """The rest of layer `i`, from its attention's output `out`: the layer's output."""
        after = parts[1] if parts else self.after_attention
        return after(self.lm.layers[i], self.gate_up[i], x, out)

    def prompt_chunk_attention(self, rows: torch.Tensor, keys: int):
        """Attention for one row whose queries are the last of its first `keys` positions (a prompt chunk)."""
        gather = self.kv.gather_index(rows, keys)

        def attend(q, k_pool, v_pool):
            return prompt_chunk_attention(q, k_pool, v_pool, gather, self.scaling)

        return attend

    def before_attention(self, layer, qkv, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Qwen2 layer up to attention: this step's queries, keys and values (R, heads, T, head_dim). No
        per-layer constants, so one compilation serves all layers."""
        batch, tokens = x.shape[:2]
        qkv_weight, qkv_bias = qkv
        h = layer.input_layernorm(x)
        q, k, v = F.linear(h, qkv_weight, qkv_bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def after_attention(self, layer, gate_up_weight, x, out) -> torch.Tensor:
        """The rest of the layer: output projection, residuals and the MLP. A long prompt piece's MLP runs
        `MLP_TOKENS` tokens at a time: its intermediate activations (about 6x the hidden size, twice over) are
        what a step's memory peaks at, and a slice of this many tokens keeps the matmuls as efficient. The norm
        runs once for the piece and each slice adds into the residual in place: a launched piece's host work is
        its op count, and per slice it stays at the MLP's own few ops."""
        batch, tokens = x.shape[:2]
        x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
        if tokens <= MLP_TOKENS:
            return x + self.mlp(layer, gate_up_weight, x)
        h = layer.post_attention_layernorm(x)
        for x_slice, h_slice in zip(x.split(MLP_TOKENS, dim=1), h.split(MLP_TOKENS, dim=1), strict=True):
            x_slice += self.gated(layer, gate_up_weight, h_slice)
        return x

    @classmethod
    def mlp(cls, layer, gate_up_weight, x) -> torch.Tensor:
        return cls.gated(layer, gate_up_weight, layer.post_attention_layernorm(x))

    @staticmethod
    def gated(layer, gate_up_weight, h) -> torch.Tensor:
        """The MLP of normed inputs `h`: down(act(gate) * up), the product written over the activation."""
        gate, up = F.linear(h, gate_up_weight).chunk(2, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate).mul_(up))

"""The language-model side of a generation step: the Qwen2.5 LM, both CFG branches and the token choice.

Per step and per stream: the positive branch reads the stream's current input embedding, the four special
tokens' logits choose what comes next, and for a speech token the CFG-negative branch reads the same input,
so the two final hidden states can condition the diffusion head (MODEL.md, "One generation step").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModel, DynamicCache

from services.common.checkpoint import Checkpoint, load_module, parameter_count, read_tensors


@dataclass
class Decision:
    stream: LMStream
    token: int
    positive: torch.Tensor | None = None  # (hidden,) for speech tokens
    negative: torch.Tensor | None = None


@dataclass
class LMStream:
    prompt_ids: list[int]
    voice_embeddings: torch.Tensor | None
    fixed_frames: int
    max_frames: int
    frames: int = 0
    segment: int = 0
    positive_cache: DynamicCache = field(default_factory=DynamicCache)
    negative_cache: DynamicCache = field(default_factory=DynamicCache)
    # The embedding the positive branch reads next (None until the prompt is prefilled).
    next_input: torch.Tensor | None = None
    # The embedding the positive branch read last: the negative branch reads the same one.
    last_input: torch.Tensor | None = None

    @property
    def prefilled(self) -> bool:
        return self.next_input is not None or self.last_input is not None


class LMEngine:
    def __init__(self, ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        cfg = ckpt.config
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = read_tensors(ckpt, ("model.language_model.", "lm_head."))
        text_config = cfg.text_config
        text_config._attn_implementation = "sdpa"
        self.lm = load_module(
            lambda: AutoModel.from_config(text_config), tensors, "model.language_model", self.device, dtype
        )
        self.embed_tokens = self.lm.get_input_embeddings()
        # Only four tokens can follow a speech prompt; their lm_head rows are all of the head we keep,
        # in ascending token-id order so that ties break as the reference's full-vocabulary argmax does.
        self.token_ids = sorted([cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id])
        head = tensors.get("lm_head.weight")
        if head is None:  # tied embeddings
            head = tensors["model.language_model.embed_tokens.weight"]
        self.head_rows = head[self.token_ids].to(self.device, dtype)
        self.audio_token_id = cfg.audio_token_id
        self.audio_bos_token_id = cfg.audio_bos_token_id
        self.eos_token_id = cfg.eos_token_id
        self.max_positions = text_config.max_position_embeddings

    def modules(self) -> dict[str, object]:
        return {"model.language_model": self.lm, "lm_head[special tokens]": self.head_rows}

    def parameter_count(self) -> int:
        return parameter_count(self.modules())

    def embed(self, token: int) -> torch.Tensor:
        return self.embed_tokens(torch.tensor([[token]], device=self.device))

    def prompt_embeddings(self, stream: LMStream) -> torch.Tensor:
        ids = torch.tensor([stream.prompt_ids], device=self.device)
        embeds = self.embed_tokens(ids)
        if stream.voice_embeddings is not None:
            mask = (ids == self.audio_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, stream.voice_embeddings.to(self.device, self.dtype))
        return embeds

    def _forward(self, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = self.lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    def _choose(self, stream: LMStream, hidden: torch.Tensor) -> int:
        if stream.fixed_frames:
            return self.audio_token_id if stream.frames < stream.fixed_frames else self.eos_token_id
        if stream.frames >= stream.max_frames:
            return self.eos_token_id
        logits = (hidden @ self.head_rows.T).float()
        return self.token_ids[int(torch.argmax(logits, dim=-1)[0])]

    @torch.inference_mode()
    def step(self, streams: list[LMStream]) -> list[Decision]:
        """One LM step for every stream: prefill new ones, read each stream's next input, choose its token."""
        decisions = []
        for s in streams:
            embeds = self.prompt_embeddings(s) if not s.prefilled else s.next_input
            hidden = self._forward(embeds, s.positive_cache)
            s.last_input, s.next_input = embeds[:, -1:], None
            token = self._choose(s, hidden)
            decision = Decision(stream=s, token=token)
            if token == self.audio_bos_token_id:
                # A new speech segment: the negative branch restarts from its single audio_bos position.
                if s.negative_cache.get_seq_length() > 1:
                    s.negative_cache.crop(1)
                s.segment += 1
            if token == self.audio_token_id:
                # The first negative step reads audio_bos (the prompt's last token); later ones the same
                # input embedding as the positive branch.
                decision.negative = self._forward(s.last_input, s.negative_cache)[0]
                decision.positive = hidden[0]
            decisions.append(decision)
        return decisions

    def accept(self, decision: Decision, speech_embedding: torch.Tensor | None) -> None:
        """Set the stream's next input: the frame's embedding for speech, else the token's embedding."""
        s = decision.stream
        if speech_embedding is not None:
            s.next_input = speech_embedding.to(self.device, self.dtype).view(1, 1, -1)
            s.frames += 1
        else:
            s.next_input = self.embed(decision.token)

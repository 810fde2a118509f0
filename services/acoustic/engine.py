"""The acoustic engine: voice prompts in, and per batched step, LM conditions in and audio + next embeddings out.

It owns the diffusion head, the sigma-VAE (encoder for voice prompts, streaming decoder for speech), the
semantic encoder and both connectors. The math follows transformers' `VibeVoiceForConditionalGeneration`
generation step by step (see MODEL.md, "One generation step"); what differs is bookkeeping: every stream
draws its noise from its own generator and keeps its own convolution state, so batching never changes a
stream's audio.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import AutoModel, GenerationConfig
from transformers.models.vibevoice.generation_vibevoice import VibeVoiceGenerationMixin
from transformers.models.vibevoice.modeling_vibevoice import VibeVoiceDiffusionHead, VibeVoiceMultiModalProjector

from services.acoustic.conv_state import ConvStateStore
from services.common.checkpoint import Checkpoint, load_module, parameter_count, read_tensors

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 3200
VOICE_CACHE_ENTRIES = 64


@dataclass(frozen=True)
class StreamSpec:
    """What the acoustic side needs to know about a stream when it joins."""

    stream_id: int
    seed: int
    cfg_scale: float
    diffusion_steps: int
    voice_count: int = 0
    voice_max_frames: int = 0


@dataclass
class StreamState:
    # Frame noise comes from a CPU generator, as in the reference (it draws on the CPU and moves the noise).
    generator: torch.Generator
    cfg_scale: float
    diffusion_steps: int


class AcousticEngine:
    def __init__(self, ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        cfg = ckpt.config
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = read_tensors(
            ckpt,
            (
                "model.audio_tower.",
                "model.semantic_tokenizer_encoder.",
                "model.multi_modal_projector.",
                "model.semantic_connector.",
                "model.diffusion_head.",
                "model.latent_scaling_factor",
                "model.latent_bias_factor",
            ),
        )

        def load(factory, prefix):
            return load_module(factory, tensors, prefix, self.device, dtype)

        hidden = cfg.text_config.hidden_size
        self.audio_tower = load(lambda: AutoModel.from_config(cfg.audio_config), "model.audio_tower")
        self.semantic_encoder = load(
            lambda: AutoModel.from_config(cfg.semantic_model_config), "model.semantic_tokenizer_encoder"
        )
        self.acoustic_connector = load(
            lambda: VibeVoiceMultiModalProjector(cfg.audio_config.hidden_size, hidden), "model.multi_modal_projector"
        )
        self.semantic_connector = load(
            lambda: VibeVoiceMultiModalProjector(cfg.semantic_model_config.hidden_size, hidden),
            "model.semantic_connector",
        )
        self.diffusion_head = load(lambda: VibeVoiceDiffusionHead(cfg.diffusion_head_config), "model.diffusion_head")
        self.latent_scale = tensors["model.latent_scaling_factor"].to(self.device, dtype)
        self.latent_bias = tensors["model.latent_bias_factor"].to(self.device, dtype)
        self.latent_size = cfg.audio_config.hidden_size
        self.vae_std = cfg.audio_config.vae_std
        self.hidden_size = hidden

        # The reference's noise scheduler, built the way generate() builds its default one.
        generation_config = GenerationConfig.from_pretrained(ckpt.path)
        self._scheduler_factory = lambda: VibeVoiceGenerationMixin._build_default_noise_scheduler(generation_config)
        self._schedulers: dict[int, object] = {}

        self.decoder_state = ConvStateStore.discover(
            self._probe(self.audio_tower.decode, self.latent_size, 1), self.device, dtype
        )
        self.semantic_state = ConvStateStore.discover(
            self._probe(self.semantic_encoder, 1, SAMPLES_PER_FRAME), self.device, dtype
        )
        self.streams: dict[int, StreamState] = {}
        self._voice_means: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _probe(self, fn, channels: int, length: int):
        def run(cache):
            x = torch.zeros(1, channels, length, device=self.device, dtype=self.dtype)
            if fn == self.audio_tower.decode:
                x = x.transpose(1, 2)
            with torch.inference_mode():
                fn(x, padding_cache=cache, use_cache=True)

        return run

    # ------------------------------------------------------------------ description

    def modules(self) -> dict[str, object]:
        return {
            "model.audio_tower": self.audio_tower,
            "model.semantic_tokenizer_encoder": self.semantic_encoder,
            "model.multi_modal_projector": self.acoustic_connector,
            "model.semantic_connector": self.semantic_connector,
            "model.diffusion_head": self.diffusion_head,
            "model.latent_scaling_factor": self.latent_scale,
            "model.latent_bias_factor": self.latent_bias,
        }

    def parameter_count(self) -> int:
        return parameter_count(self.modules())

    # ------------------------------------------------------------------ voice prompts

    def _voice_mean(self, samples: torch.Tensor) -> torch.Tensor:
        """The sigma-VAE encoder's latents for one voice, (frames, latent); cached by content hash."""
        key = hashlib.sha256(samples.numpy().tobytes()).hexdigest()
        cached = self._voice_means.get(key)
        if cached is not None:
            self._voice_means.move_to_end(key)
            return cached
        frames = -(-samples.numel() // SAMPLES_PER_FRAME)
        padded = torch.zeros(1, 1, frames * SAMPLES_PER_FRAME, dtype=self.dtype, device=self.device)
        padded[0, 0, : samples.numel()] = samples.to(self.device, self.dtype)
        with torch.inference_mode():
            mean = self.audio_tower.encode(padded, sample=False).latents[0]
        self._voice_means[key] = mean
        if len(self._voice_means) > VOICE_CACHE_ENTRIES:
            self._voice_means.popitem(last=False)
        return mean

    def _voice_draws(
        self, generator: torch.Generator, count: int, max_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The reference samples all voices of a request as one padded batch: one std per voice, then
        # `randn_like` noise for the whole block. The encoder's latents are a transposed view, and the
        # noise is drawn into a tensor of that same layout. These are the first draws of the seed.
        std = torch.randn(count, generator=generator, device=self.device, dtype=self.dtype)
        noise = torch.empty(count, self.latent_size, max_frames, device=self.device, dtype=self.dtype)
        return std, noise.transpose(1, 2).normal_(generator=generator)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def encode_voices(self, voices: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, list[int]]:
        """Voice prompts -> embeddings for their placeholder positions, (sum of frames, hidden)."""
        means = [self._voice_mean(v) for v in voices]
        frames = [m.shape[0] for m in means]
        std, noise = self._voice_draws(self.new_generator(seed), len(voices), max(frames))
        with torch.inference_mode():
            latents = torch.cat(
                [m + self.vae_std * std[i] * noise[i, : m.shape[0]] for i, m in enumerate(means)], dim=0
            )
            features = (latents + self.latent_bias) * self.latent_scale
            return self.acoustic_connector(features).float().cpu(), frames

    # ------------------------------------------------------------------ streams

    def start(self, spec: StreamSpec) -> None:
        generator = torch.Generator().manual_seed(spec.seed)
        if spec.voice_count and self.device.type == "cpu":
            # On the CPU voice sampling and frame noise share one generator: replay the voice draws.
            self._voice_draws(generator, spec.voice_count, spec.voice_max_frames)
        self.streams[spec.stream_id] = StreamState(generator, spec.cfg_scale, spec.diffusion_steps)
        self.decoder_state.add(spec.stream_id)
        self.semantic_state.add(spec.stream_id)

    def end(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.decoder_state.remove(stream_id)
        self.semantic_state.remove(stream_id)

    def _scheduler(self, steps: int):
        if steps not in self._schedulers:
            self._schedulers[steps] = self._scheduler_factory()
        return self._schedulers[steps]

    @torch.inference_mode()
    def _sample_latents(self, ids: list[int], positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Diffusion with classifier-free guidance for the streams `ids` (all with the same step count)."""
        states = [self.streams[s] for s in ids]
        n = len(ids)
        # Each stream draws (2, latent) as the reference does for a batch of one, and uses the first row.
        noise = torch.stack([torch.randn(2, self.latent_size, generator=st.generator)[0] for st in states])
        noise = noise.to(self.device, self.dtype)
        cfg = torch.tensor([st.cfg_scale for st in states], device=self.device, dtype=self.dtype)[:, None]
        condition = torch.cat([positive, negative], dim=0)
        scheduler = self._scheduler(states[0].diffusion_steps)
        scheduler.set_timesteps(num_inference_steps=states[0].diffusion_steps)
        latent = noise
        for t in scheduler.timesteps:
            both = torch.cat([latent, latent], dim=0)
            v = self.diffusion_head(both, t.repeat(2 * n).to(both), condition=condition)
            v_cond, v_uncond = v[:n], v[n:]
            guided = v_uncond + cfg * (v_cond - v_uncond)
            latent = scheduler.step(guided, t, latent).prev_sample
        return latent

    @torch.inference_mode()
    def render(
        self, ids: list[int], positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched step: (N, hidden) conditions -> next input embeddings (N, hidden), audio (N, 3200)."""
        positive = positive.to(self.device, self.dtype)
        negative = negative.to(self.device, self.dtype)
        latent = torch.empty(len(ids), self.latent_size, device=self.device, dtype=self.dtype)
        by_steps: dict[int, list[int]] = {}
        for row, s in enumerate(ids):
            by_steps.setdefault(self.streams[s].diffusion_steps, []).append(row)
        for rows in by_steps.values():
            index = torch.tensor(rows, device=self.device)
            latent[index] = self._sample_latents([ids[r] for r in rows], positive[index], negative[index])
        latent = latent[:, None, :]  # (N, 1, latent): one frame per stream

        decoder_cache = self.decoder_state.gather(ids)
        audio = self.audio_tower.decode(
            latent / self.latent_scale - self.latent_bias, padding_cache=decoder_cache, use_cache=True
        ).audio
        self.decoder_state.scatter(ids, decoder_cache)

        semantic_cache = self.semantic_state.gather(ids)
        semantic = self.semantic_encoder(audio, padding_cache=semantic_cache, use_cache=True).latents
        self.semantic_state.scatter(ids, semantic_cache)

        embeds = self.acoustic_connector(latent) + self.semantic_connector(semantic)
        return embeds[:, 0].float().cpu(), audio[:, 0].float().cpu()

    def step(
        self,
        starts: list[StreamSpec],
        ids: list[int],
        positive: torch.Tensor | None,
        negative: torch.Tensor | None,
        ends: list[int],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One message of the Render protocol: join `starts`, render `ids`, then release `ends`."""
        for spec in starts:
            self.start(spec)
        result = self.render(ids, positive, negative) if ids else (None, None)
        for s in ends:
            self.end(s)
        return result

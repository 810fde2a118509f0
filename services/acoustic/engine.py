"""The acoustic engine: voice prompts in, and per batched step, LM conditions in and audio + next embeddings out.

It owns the diffusion head, the sigma-VAE (encoder for voice prompts, streaming decoder for speech), the
semantic encoder and both connectors. The math follows transformers' `VibeVoiceForConditionalGeneration`
generation step by step (see MODEL.md, "One generation step"); what differs is bookkeeping: every stream
draws its noise from its own generator and keeps its own convolution state, so batching never changes a
stream's audio. A resumed stream (a job going on from its checkpoint) gets both back from the frames it made:
its generator skips their noise and its convolution state is replayed from their last latents.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import AutoModel
from transformers.models.vibevoice.generation_vibevoice import VibeVoiceGenerationMixin
from transformers.models.vibevoice.modeling_vibevoice import VibeVoiceDiffusionHead, VibeVoiceMultiModalProjector
from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
    VibeVoiceAcousticTokenizerConv1dPaddingCache,
)

from services.acoustic.conv_state import ConvStateRows
from services.acoustic.convnext_kernel import fused_block_step
from services.acoustic.diffusion import fuse_head, guided_velocity
from services.acoustic.dpm_solver import DPMSolverPlan
from services.acoustic.receptive_field import state_frames
from services.acoustic.streaming import convnext_step, streaming_forward
from services.acoustic.voice_prompts import normalize_voice
from services.common.audio import SAMPLES_PER_FRAME, voice_digest
from services.common.checkpoint import Checkpoint, generation_config, load_module, parameter_count, read_tensors
from services.common.cuda_graphs import CapturedStep, bucket_for, buckets_up_to, capture_fastest_convolutions, compiled
from services.common.tensors import device_tensor, to_device
from services.render.values import RenderResult, RenderStep, StreamHistory, StreamSpec

log = logging.getLogger(__name__)

VOICE_CACHE_ENTRIES = 64
VOICE_CHUNK_SAMPLES = 150 * SAMPLES_PER_FRAME  # 20 s: bench/voice_encode.py
GRAPH_DIFFUSION_STEPS = 10  # steps captured as CUDA graphs; other step counts run eagerly
REPLAY_PIECE_FRAMES = 32  # frames a resume replays in one pass (their activations are held at once)


@dataclass
class StreamState:
    # Frame noise comes from a CPU generator, as in the reference (it draws on the CPU and moves the noise).
    generator: torch.Generator
    diffusion_steps: int
    row: int
    noise: torch.Tensor | None = None  # the next frame's noise, drawn while the GPU renders this one


class AcousticEngine:
    def __init__(
        self,
        ckpt: Checkpoint,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_streams: int = 256,
        cuda_graphs: bool = True,
        torch_compile: bool = False,
    ) -> None:
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
        fuse_head(self.diffusion_head)
        self.latent_scale = tensors["model.latent_scaling_factor"].to(self.device, dtype)
        self.latent_bias = tensors["model.latent_bias_factor"].to(self.device, dtype)
        self.latent_size = cfg.audio_config.hidden_size
        self.vae_std = cfg.audio_config.vae_std
        self.hidden_size = hidden

        # The reference's noise scheduler, built the way generate() builds its default one, turned into a
        # fixed tensor plan per step count.
        generation = generation_config(ckpt)
        self._scheduler_factory = lambda: VibeVoiceGenerationMixin._build_default_noise_scheduler(generation)
        self._plans: dict[int, DPMSolverPlan] = {}

        # Per-stream convolution state, one row per stream, planned for the most streams we take.
        self.max_streams = max_streams
        self.decoder_state = ConvStateRows.discover(
            self._probe(lambda x, **kw: self.audio_tower.decode(x.transpose(1, 2), **kw), self.latent_size, 1),
            max_streams,
            self.device,
            dtype,
        )
        self.semantic_state = ConvStateRows.discover(
            self._probe(self.semantic_encoder, 1, SAMPLES_PER_FRAME), max_streams, self.device, dtype
        )
        self.semantic_size = cfg.semantic_model_config.hidden_size
        # A resumed stream's conv state is rebuilt from its last frames: the decoder's state reaches back
        # over its own receptive field, and the semantic encoder's over its own, of audio that the decoder
        # makes exactly only once its state is.
        self.replay_frames = state_frames(
            self._probe(lambda x, **kw: self.audio_tower.decode(x.transpose(1, 2), **kw), self.latent_size, 1)
        ) + state_frames(self._probe(self.semantic_encoder, 1, SAMPLES_PER_FRAME))
        self.streams: dict[int, StreamState] = {}
        self.cfg_rows = torch.ones(max_streams, 1, device=self.device, dtype=dtype)  # guidance scale by row
        self.order: list[int] = []  # stream ids by row
        self._voice_means: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.voice_chunk_samples = VOICE_CHUNK_SAMPLES  # a pass of the voice encoder (bench/voice_encode.py)
        # Rendering runs on a high-priority CUDA stream and voice encoding on a low-priority one, so a new
        # request's voices wait for playing streams' frames, not the other way round.
        cuda = self.device.type == "cuda"
        self._render_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._encode_stream = torch.cuda.Stream(self.device, priority=0) if cuda else None

        # The captured steps may run torch.compile'd code (one compilation shared by all buckets) and the fused
        # block kernel at the highest-rate stages; the eager path for unusual steps never does, so it cannot trigger
        # a compilation while streams are playing.
        self._compiled_diffusion = self._diffuse
        self._compiled_block = convnext_step
        if torch_compile and cuda and cuda_graphs:
            self._compiled_diffusion = compiled(self._diffuse)
            self._compiled_block = compiled(convnext_step)
        if cuda and cuda_graphs:  # `convnext_kernel.MAX_CHANNELS` says at which stages
            self._compiled_block = fused_block_step(self._compiled_block)
        # The usual step (every stream at GRAPH_DIFFUSION_STEPS) reads its inputs from these buffers and renders
        # the leading rows of a batch bucket. On the GPU it is captured per bucket; elsewhere it is called as
        # it is, so the CPU runs the control flow the graphs replay (row moves, padding rows put back).
        rows = max_streams
        self._condition = torch.zeros(2 * rows, hidden, device=self.device, dtype=dtype)
        self._noise_in = torch.zeros(rows, self.latent_size, device=self.device, dtype=dtype)
        self.graphs: dict[int, CapturedStep] = {}
        if cuda_graphs and cuda:
            self._capture_graphs()

    def _probe(self, fn, channels: int, length: int):
        def run(cache):
            x = torch.zeros(1, channels, length, device=self.device, dtype=self.dtype)
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

    def _voice_mean(self, decoded: torch.Tensor) -> torch.Tensor:
        """The sigma-VAE encoder's latents for one voice as decoded (24 kHz mono float32), (frames, latent);
        cached by the digest of those samples, which is what EncodeVoice's voice_digests name."""
        key = voice_digest(decoded.numpy()).hex()
        cached = self._voice_means.get(key)
        if cached is not None:
            self._voice_means.move_to_end(key)
            return cached
        samples = normalize_voice(decoded)
        frames = -(-samples.numel() // SAMPLES_PER_FRAME)
        padded = torch.zeros(1, 1, frames * SAMPLES_PER_FRAME, dtype=self.dtype, device=self.device)
        padded[0, 0, : samples.numel()] = samples.to(self.device, self.dtype)
        # The encoder is causal: encoding in chunks through its streaming cache gives the same latents, in
        # short kernels that interleave with the frames being rendered instead of holding the GPU.
        cache = VibeVoiceAcousticTokenizerConv1dPaddingCache()
        with torch.inference_mode():
            parts = [
                self.audio_tower.encode(chunk, padding_cache=cache, use_cache=True, sample=False).latents[0]
                for chunk in padded.split(self.voice_chunk_samples, dim=-1)
            ]
        mean = torch.cat(parts)
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

    def encode_voices(self, voices: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, list[int]]:
        """Voice prompts (as decoded: 24 kHz mono float32, not yet normalised) -> embeddings for their placeholder
        positions, (sum of frames, hidden), on the CPU.

        On the GPU this runs on its own CUDA stream, beside the frames being rendered.
        """
        with self._encoding():
            return self._embeddings([self._voice_mean(v) for v in voices], seed)

    def encode_cached_voices(self, digests: list[bytes], seed: int) -> tuple[torch.Tensor, list[int]] | int:
        """`encode_voices` for voices encoded before, given by the SHA-256 of their samples: the same embeddings,
        or the index of the first voice no longer in the cache."""
        means = []
        for i, digest in enumerate(digests):
            mean = self._voice_means.get(digest.hex())
            if mean is None:
                return i
            self._voice_means.move_to_end(digest.hex())
            means.append(mean)
        with self._encoding():
            return self._embeddings(means, seed)

    def _encoding(self) -> contextlib.AbstractContextManager:
        """Where voices are encoded: on the GPU, a CUDA stream of their own, beside the frames being rendered."""
        return contextlib.nullcontext() if self._encode_stream is None else torch.cuda.stream(self._encode_stream)

    def _embeddings(self, means: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, list[int]]:
        frames = [m.shape[0] for m in means]
        std, noise = self._voice_draws(torch.Generator(device=self.device).manual_seed(seed), len(means), max(frames))
        with torch.inference_mode():
            latents = torch.cat(
                [m + self.vae_std * std[i] * noise[i, : m.shape[0]] for i, m in enumerate(means)], dim=0
            )
            features = (latents + self.latent_bias) * self.latent_scale
            # In the connector's dtype: the llm takes them in its own (the same), so float32 would only double
            # the megabytes on both hops.
            return self.acoustic_connector(features).cpu(), frames

    # ------------------------------------------------------------------ streams

    def start(self, spec: StreamSpec) -> None:
        if len(self.order) >= self.max_streams:
            raise RuntimeError(f"acoustic engine is full ({self.max_streams} streams)")
        generator = torch.Generator().manual_seed(spec.seed)
        if spec.voice_count and self.device.type == "cpu":
            # On the CPU voice sampling and frame noise share one generator: replay the voice draws.
            self._voice_draws(generator, spec.voice_count, spec.voice_max_frames)
        row = len(self.order)
        self.streams[spec.stream_id] = StreamState(generator, spec.diffusion_steps, row)
        self.order.append(spec.stream_id)
        self.cfg_rows[row] = spec.cfg_scale
        self.decoder_state.reset(row)
        self.semantic_state.reset(row)
        if spec.history is not None:
            self._rebuild(self.streams[spec.stream_id], spec.history)

    @torch.inference_mode()
    def _rebuild(self, state: StreamState, history: StreamHistory) -> None:
        """A resumed stream: its generator skips the noise of the frames made, and its decoder and semantic
        state comes from replaying the last frames' latents. The convolutions are causal, so frames replayed
        several at a time leave the state that rendering them one by one left; a resume runs inside a render
        step, so the fewer passes, the shorter the other streams' wait."""
        for _ in range(history.frames_made):
            self._draw(state)
        rows = device_tensor([state.row], self.device)
        decoder_cache, semantic_cache = self.decoder_state.gather(rows), self.semantic_state.gather(rows)
        latents = history.replay_latents.to(self.device, self.dtype)
        for piece in latents.split(REPLAY_PIECE_FRAMES):
            scaled = (piece[None] / self.latent_scale - self.latent_bias).transpose(1, 2)  # (1, latent, frames)
            audio = streaming_forward(self.audio_tower.decoder, scaled, decoder_cache)
            streaming_forward(self.semantic_encoder, audio, semantic_cache)
        self.decoder_state.scatter(rows, decoder_cache)
        self.semantic_state.scatter(rows, semantic_cache)

    @torch.inference_mode()
    def embed_frames(self, latents: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """Frames made earlier, (F, latent) and (F, semantic) -> the input embeddings they gave the llm, (F, hidden),
        computed as a step computes them."""
        latent = latents.to(self.device, self.dtype)[:, None, :]
        features = semantic.to(self.device, self.dtype)[:, None, :]
        return (self.acoustic_connector(latent) + self.semantic_connector(features))[:, 0]

    def end(self, stream_id: int) -> None:
        state = self.streams.pop(stream_id, None)
        if state is None:
            return
        last = len(self.order) - 1
        if state.row != last:
            moved = self.order[last]
            for store in (self.decoder_state, self.semantic_state):
                store.move(last, state.row)
            self.cfg_rows[state.row] = self.cfg_rows[last]
            self.streams[moved].row = state.row
            self.order[state.row] = moved
        self.order.pop()

    def _speakers_first(self, states: list[StreamState]) -> None:
        """Move the n streams rendered this step into rows [0, n), so a graph over the leading rows serves them.

        Streams that joined but do not speak yet, or pause for a token, keep their state in rows >= n.
        """
        n = len(states)
        speaking = {st.row for st in states}
        holes = [r for r in range(n) if r not in speaking]
        outside = [st.row for st in states if st.row >= n]
        if outside:
            self._exchange(outside, holes)

    def _exchange(self, rows: list[int], others: list[int]) -> None:
        """Exchange the rows of the streams in `rows[i]` and `others[i]`, every pair at once: one gather per state
        tensor, however many move (the halves of a pipelined llm step take turns, half the batch each time)."""
        a = device_tensor(rows, self.device)
        b = device_tensor(others, self.device)
        for store in (self.decoder_state, self.semantic_state):
            store.exchange(a, b)
        self.cfg_rows[torch.cat([a, b])] = self.cfg_rows[torch.cat([b, a])]
        for ra, rb in zip(rows, others, strict=True):
            sa, sb = self.order[ra], self.order[rb]
            self.order[ra], self.order[rb] = sb, sa
            self.streams[sa].row, self.streams[sb].row = rb, ra

    def _plan(self, steps: int) -> DPMSolverPlan:
        if steps not in self._plans:
            self._plans[steps] = DPMSolverPlan(self._scheduler_factory(), steps)
        return self._plans[steps]

    def _draw(self, state: StreamState) -> torch.Tensor:
        # Each stream draws (2, latent) as the reference does for a batch of one, and uses the first row.
        return torch.randn(2, self.latent_size, generator=state.generator)[0]

    def _noise(self, states: list[StreamState]) -> torch.Tensor:
        """This frame's noise per stream: drawn ahead during the previous frame, or now."""
        noise = [st.noise if st.noise is not None else self._draw(st) for st in states]
        for st in states:
            st.noise = None
        return to_device(torch.stack(noise), self.device, self.dtype)

    def _draw_ahead(self, states: list[StreamState]) -> None:
        # The host draws the next frame's noise while the GPU renders this one; each generator still
        # yields its frames' noise in order.
        for st in states:
            st.noise = self._draw(st)

    def _diffuse(self, condition, noise, cfg, plan: DPMSolverPlan) -> torch.Tensor:
        """The diffusion head's sampling loop with CFG: (2n, hidden) conditions, (n, latent) noise -> latents."""
        return plan.sample(guided_velocity(self.diffusion_head, plan, condition, cfg), noise)

    def _frame(self, condition, noise, cfg, plan: DPMSolverPlan, decoder_cache, semantic_cache, use_compiled=False):
        """Diffusion with CFG, decode, semantic encode, connectors for one frame of n streams: (embeddings, audio,
        latents, semantic features), one row per stream."""
        diffuse, block = (self._diffuse, convnext_step)
        if use_compiled:
            diffuse, block = self._compiled_diffusion, self._compiled_block
        latent = diffuse(condition, noise, cfg, plan)[:, None, :]  # (n, 1, latent): one frame per stream
        scaled = (latent / self.latent_scale - self.latent_bias).transpose(1, 2)
        audio = streaming_forward(self.audio_tower.decoder, scaled, decoder_cache, block)
        semantic = streaming_forward(self.semantic_encoder, audio, semantic_cache, block).transpose(1, 2)
        embeds = self.acoustic_connector(latent) + self.semantic_connector(semantic)
        return embeds[:, 0], audio[:, 0], latent[:, 0], semantic[:, 0]

    def _bucket_step(self, n: int):
        """The usual step over the first `n` rows, reading `_condition` and `_noise_in`."""
        plan = self._plan(GRAPH_DIFFUSION_STEPS)
        rows = self.max_streams

        def step():
            condition = torch.cat([self._condition[:n], self._condition[rows : rows + n]], dim=0)
            return self._frame(
                condition,
                self._noise_in[:n],
                self.cfg_rows[:n],
                plan,
                self.decoder_state.leading(n),
                self.semantic_state.leading(n),
                use_compiled=True,
            )

        return step

    def _capture_graphs(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # outputs are consumed before the next replay
        conv_kernels = {}
        for n in buckets_up_to(self.max_streams):
            with torch.inference_mode():
                self.graphs[n], cudnn = capture_fastest_convolutions(self._bucket_step(n), pool)
            conv_kernels[n] = "cudnn" if cudnn else "native"
        for store in (self.decoder_state, self.semantic_state):  # warm-up ran on rows no stream owns yet
            for t in store.state.values():
                t.zero_()
        log.info("captured acoustic graphs, convolutions by batch size: %s", conv_kernels)

    def render(
        self, ids: list[int], positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched step: next input embeddings (N, hidden) and audio (N, 3200) (`render_frames` for the rest)."""
        embeds, audio, _, _ = self.render_frames(ids, positive, negative)
        return embeds, audio

    def render_frames(self, ids: list[int], positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One batched step on the render stream: embeddings, audio, latents and semantic features, ready on the
        caller's stream."""
        if self._render_stream is None:
            return self._render(ids, positive, negative)
        caller = torch.cuda.current_stream(self.device)
        self._render_stream.wait_stream(caller)
        with torch.cuda.stream(self._render_stream):
            results = self._render(ids, positive, negative)
        caller.wait_stream(self._render_stream)
        for t in results:
            t.record_stream(caller)
        return results

    @torch.inference_mode()
    def _render(self, ids: list[int], positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One batched step: (N, hidden) conditions -> next input embeddings (N, hidden), audio (N, 3200), latents
        (N, latent) and semantic features (N, semantic).

        Results stay on the engine's device.
        """
        states = [self.streams[s] for s in ids]
        n = len(ids)
        positive = to_device(positive, self.device, self.dtype)
        negative = to_device(negative, self.device, self.dtype)
        noise = self._noise(states)
        usual = [i for i, st in enumerate(states) if st.diffusion_steps == GRAPH_DIFFUSION_STEPS]
        if len(usual) == n:
            results = self._render_leading(states, positive, negative, noise)
            self._draw_ahead(states)
            return results
        # Streams with other step counts render apart, each count as one eager group; the others still go
        # through the usual step, so one unusual request does not slow its whole batch.
        widths = (self.hidden_size, SAMPLES_PER_FRAME, self.latent_size, self.semantic_size)
        results = tuple(torch.empty(n, w, device=self.device, dtype=self.dtype) for w in widths)
        if usual:
            index = device_tensor(usual, self.device)
            leading = [states[i] for i in usual]
            rendered = self._render_leading(leading, positive[index], negative[index], noise[index])
            for out, part in zip(results, rendered, strict=True):
                out[index] = part
        cfg = self.cfg_rows[device_tensor([st.row for st in states], self.device)]
        for count in sorted({st.diffusion_steps for st in states} - {GRAPH_DIFFUSION_STEPS}):
            group = [i for i, st in enumerate(states) if st.diffusion_steps == count]
            index = device_tensor(group, self.device)
            rows = device_tensor([states[i].row for i in group], self.device)
            decoder_cache = self.decoder_state.gather(rows)
            semantic_cache = self.semantic_state.gather(rows)
            condition = torch.cat([positive[index], negative[index]], dim=0)
            rendered = self._frame(
                condition, noise[index], cfg[index], self._plan(count), decoder_cache, semantic_cache
            )
            self.decoder_state.scatter(rows, decoder_cache)
            self.semantic_state.scatter(rows, semantic_cache)
            for out, part in zip(results, rendered, strict=True):
                out[index] = part
        self._draw_ahead(states)
        return results

    def _render_leading(
        self, states: list[StreamState], positive: torch.Tensor, negative: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The usual step for `states`, in whatever order the llm lists them: they move to the leading rows,
        and a bucket's step (its graph on the GPU) renders them."""
        n = len(states)
        if n < len(self.order):
            self._speakers_first(states)
        rows = [st.row for st in states]
        bucket = bucket_for(n, self.max_streams)
        limit = self.max_streams
        # The step also steps the padding rows [n, bucket); those of streams that sit this step out are put
        # back afterwards.
        held = min(bucket, len(self.order))
        stores = (self.decoder_state, self.semantic_state) if held > n else ()
        saved = [(store, store.snapshot(n, held)) for store in stores]
        index = slice(0, n) if rows == list(range(n)) else device_tensor(rows, self.device)
        self._condition[index], self._condition[limit : limit + bucket][index] = positive, negative
        self._noise_in[index] = noise
        results = self.graphs[bucket].replay() if self.graphs else self._bucket_step(bucket)()
        for store, rows_saved in saved:
            store.restore(n, rows_saved)
        return tuple(t[index] for t in results)

    def step(self, step: RenderStep) -> RenderResult:
        """One Render step: join `starts`, render `ids`, then release `ends`.

        Ends that do not render in this step are released first, so their rows are free for the step.
        """
        rendered = set(step.ids)
        for s in step.ends:
            if s not in rendered:
                self.end(s)
        for spec in step.starts:
            self.start(spec)
        result = RenderResult()
        if step.ids:
            result = RenderResult(*self.render_frames(step.ids, step.positive, step.negative))
        for s in step.ends:
            if s in rendered:
                self.end(s)
        return result

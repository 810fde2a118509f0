"""The language-model side of every generation step, for all streams at once.

Per step: each new stream's prompt is prefilled in chunks between decode steps; then one batched forward
runs every decoding stream's three branches, and the next token is chosen as transformers' `generate()`
chooses it (its generation loop in `generation_vibevoice.py` is the specification):

- the positive branch reads the prompt and every step's input (a frame's embedding after speech, the
  token's embedding otherwise);
- `generate(guidance_scale=g)` also installs transformers' token-level classifier-free guidance
  (`UnbatchedClassifierFreeGuidanceLogitsProcessor`): an unconditional branch that starts from the prompt's
  last token and reads only the generated token ids (the speech token's own embedding, not the frame's).
  The choice is the argmax over the four special tokens of `g * log p_pos + (1 - g) * log p_uncond`; the
  log-softmax normalizers are the same for every token, so `g * logit_pos + (1 - g) * logit_uncond` over
  the four head rows gives the same argmax without the full-vocabulary head;
- the speech-CFG negative branch steps only when the stream speaks, with the same input as the positive
  branch; `audio_bos` empties it (the reference masks everything before the new segment's first speech
  step, so that step attends to itself alone); `audio_eos` changes nothing on either side.

The two final hidden states of the streams that chose the speech token go to the acoustic side.

Stream state lives in persistent device buffers indexed by slot (next inputs, branch lengths, guidance), so
the decode step has fixed shapes per batch bucket and is captured as a CUDA graph on the GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModel

from services.common.checkpoint import Checkpoint, load_module, parameter_count, read_tensors
from services.common.cuda_graphs import CapturedStep, bucket_for, buckets_up_to
from services.llm.decoder import SlotDecoder
from services.llm.kv_slots import BRANCHES, NEGATIVE, POSITIVE, UNCONDITIONAL, KVSlots

log = logging.getLogger(__name__)

KEY_BLOCK = 256  # eager attention reads keys up to the next multiple of this


@dataclass(eq=False)  # compared by identity: two identical requests are two streams
class LMStream:
    prompt_ids: list[int]
    voice_embeddings: torch.Tensor | None
    fixed_frames: int  # a test and benchmark option: exactly this many frames, whatever the model chooses
    max_frames: int
    cfg_scale: float = 1.3
    frames: int = 0
    segment: int = 0
    slot: int | None = None
    prefilled: int = 0  # prompt tokens written to the KV cache (all but the last, which the first step reads)
    positive_len: int = 0
    negative_len: int = 0
    unconditional_len: int = 0
    prompt_embeds: torch.Tensor | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids) - 1 and self.prompt_embeds is None


# Why a stream ended: the model's own end-of-sequence, or a limit that stopped it first.
FINISH_EOS = "eos"
FINISH_FIXED_FRAMES = "fixed_frames"
FINISH_MAX_FRAMES = "max_frames"  # the request's frame budget (max_audio_seconds)
FINISH_CONTEXT = "context"  # the stream's positions reached the end of the context


@dataclass(eq=False)
class Decision:
    stream: LMStream
    row: int  # the stream's row in this step's batch
    token: int
    speech: bool  # a speech frame: its conditions go to the acoustic side
    finish: str | None = None  # set when the stream ends at this step


class LMEngine:
    def __init__(
        self,
        ckpt: Checkpoint,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_streams: int = 64,
        max_context: int | None = None,
        prefill_chunk: int = 512,
        memory_fraction: float = 0.9,
        cuda_graphs: bool = True,
        torch_compile: bool = False,
    ) -> None:
        cfg = ckpt.config
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = read_tensors(ckpt, ("model.language_model.", "lm_head."))
        text = cfg.text_config
        text._attn_implementation = "sdpa"
        self.lm = load_module(lambda: AutoModel.from_config(text), tensors, "model.language_model", self.device, dtype)
        self.embed_tokens = self.lm.get_input_embeddings()
        # Only four tokens can follow a speech prompt; their lm_head rows are all of the head we keep, in
        # ascending token-id order so that ties break as the reference's full-vocabulary argmax does.
        self.token_ids = sorted([cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id])
        head = tensors.get("lm_head.weight", tensors["model.language_model.embed_tokens.weight"])  # tied
        self.head_rows = head[self.token_ids].to(self.device, dtype)
        self.audio_token_id = cfg.audio_token_id
        self.audio_bos_token_id = cfg.audio_bos_token_id
        self.eos_token_id = cfg.eos_token_id
        self.hidden = text.hidden_size
        self.prefill_chunk = prefill_chunk

        # Memory is planned here, once: KV slots for both branches of every stream, from the budget.
        max_len = min(max_context or text.max_position_embeddings, text.max_position_embeddings)
        head_dim = self.lm.layers[0].self_attn.head_dim
        per_slot = KVSlots.bytes_per_slot(text.num_hidden_layers, text.num_key_value_heads, head_dim, max_len, dtype)
        slots = max_streams
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            free_budget = int(total * memory_fraction) - torch.cuda.memory_allocated(self.device)
            slots = min(max_streams, max(0, free_budget) // per_slot)
            if slots < 1:
                raise RuntimeError(
                    f"no room for one stream: {per_slot / 2**30:.2f} GiB of KV per stream at --max-context {max_len}"
                )
        self.kv = KVSlots(
            text.num_hidden_layers, text.num_key_value_heads, head_dim, slots, max_len, self.device, dtype
        )
        self.decoder = SlotDecoder(self.lm, self.kv)
        self.max_positions = max_len - 1  # the last position of every row is scratch space
        self.vocab_size = text.vocab_size
        log.info("KV slots: %d streams x %d positions (%.2f GiB)", slots, max_len, slots * per_slot / 2**30)

        self.streams: list[LMStream] = []  # by slot: decoding streams first, then those being prefilled
        self.next_inputs = torch.zeros(slots, self.hidden, device=self.device, dtype=dtype)  # both CFG branches
        self.token_inputs = torch.zeros(slots, self.hidden, device=self.device, dtype=dtype)  # unconditional
        self.guidance = torch.ones(slots, 1, device=self.device, dtype=torch.float32)
        self.positions = torch.full((slots, BRANCHES), self.kv.scratch, device=self.device, dtype=torch.long)
        with torch.inference_mode():
            self.audio_token_embedding = self.embed_tokens(torch.tensor(self.audio_token_id, device=self.device))
        self.graphs: dict[int, CapturedStep] = {}
        self._compiled = torch_compile and cuda_graphs and self.device.type == "cuda"
        if self._compiled:
            self.decoder.compile()
        if cuda_graphs and self.device.type == "cuda":
            self._capture_graphs()

    # ------------------------------------------------------------------ description

    @property
    def capacity(self) -> int:
        return self.kv.slots

    def modules(self) -> dict[str, object]:
        return {"model.language_model": self.lm, "lm_head[special tokens]": self.head_rows}

    def parameter_count(self) -> int:
        return parameter_count(self.modules())

    # ------------------------------------------------------------------ admission and release

    def admit(self, stream: LMStream) -> bool:
        """Give the stream a slot if one is free; its prompt is prefilled by later `prefill` calls."""
        if len(self.streams) >= self.kv.slots:
            return False
        stream.slot = len(self.streams)
        self.streams.append(stream)
        self.guidance[stream.slot] = stream.cfg_scale
        ids = torch.tensor(stream.prompt_ids, device=self.device)
        with torch.inference_mode():
            embeds = self.embed_tokens(ids)
            if stream.voice_embeddings is not None:
                mask = (ids == self.audio_token_id)[:, None].expand_as(embeds)
                embeds = embeds.masked_scatter(mask, stream.voice_embeddings.to(self.device, self.dtype))
        stream.prompt_embeds = embeds
        return True

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        stream = self.streams[src]
        self.kv.move(src, dst)
        self.next_inputs[dst] = self.next_inputs[src]
        self.token_inputs[dst] = self.token_inputs[src]
        self.guidance[dst] = self.guidance[src]
        self.positions[dst] = self.positions[src]
        self.streams[dst] = stream
        stream.slot = dst

    def release(self, stream: LMStream) -> None:
        """Free the stream's slot, keeping decoding streams packed first and prefilling ones after them."""
        if stream.slot is None:
            return
        i, n = stream.slot, self.decoding_count
        if i < n:
            self._move(n - 1, i)
            i = n - 1
        self._move(len(self.streams) - 1, i)
        self.streams.pop()
        self.positions[len(self.streams)] = self.kv.scratch
        stream.slot = None

    @property
    def decoding_count(self) -> int:
        return sum(1 for s in self.streams if s.decoding)

    # ------------------------------------------------------------------ prefill

    def _keys(self, upto: int) -> int:
        return min(self.kv.max_len, -(-upto // KEY_BLOCK) * KEY_BLOCK)

    @torch.inference_mode()
    def prefill(self, budget: int) -> list[LMStream]:
        """Write up to `budget` prompt tokens into the KV cache; returns the streams that became ready."""
        ready = []
        for stream in self.streams[self.decoding_count :]:
            if budget <= 0:
                break
            target = len(stream.prompt_ids) - 1
            while stream.prefilled < target and budget > 0:
                a = stream.prefilled
                b = min(target, a + self.prefill_chunk, a + budget)
                positions = torch.arange(a, b, device=self.device)[None]
                row = BRANCHES * stream.slot + POSITIVE
                self.decoder.forward(stream.prompt_embeds[None, a:b], row, positions, self._keys(b))
                stream.prefilled, budget = b, budget - (b - a)
            if stream.prefilled == target:
                # The prompt's last token (audio_bos) is the first step's input for every branch; the
                # unconditional one reads it as a token id, like every token after it.
                self.next_inputs[stream.slot] = stream.prompt_embeds[-1]
                last = torch.tensor(stream.prompt_ids[-1], device=self.device)
                self.token_inputs[stream.slot] = self.embed_tokens(last)
                stream.positive_len, stream.negative_len, stream.unconditional_len = target, 0, 0
                self.positions[stream.slot] = torch.tensor([target, 0, 0], device=self.device)
                stream.prompt_embeds = None
                ready.append(stream)
        return ready

    # ------------------------------------------------------------------ decode

    def _decode_rows(self, rows: int, keys: int, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the first `rows` slots: (hidden states of every branch row, guided scores (rows, 4))."""
        branches = [None] * BRANCHES
        branches[POSITIVE] = branches[NEGATIVE] = self.next_inputs[:rows]
        branches[UNCONDITIONAL] = self.token_inputs[:rows]
        x = torch.stack(branches, dim=1).reshape(BRANCHES * rows, 1, self.hidden)
        positions = self.positions[:rows].reshape(BRANCHES * rows, 1)
        hidden = self.decoder.forward(x, 0, positions, keys, compiled)[:, 0]
        positive = (hidden[POSITIVE::BRANCHES] @ self.head_rows.T).float()
        unconditional = (hidden[UNCONDITIONAL::BRANCHES] @ self.head_rows.T).float()
        g = self.guidance[:rows]
        return hidden, g * positive + (1 - g) * unconditional

    def _capture_graphs(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # outputs are consumed before the next replay
        for rows in buckets_up_to(self.kv.slots):
            with torch.inference_mode():
                step = functools.partial(self._decode_rows, rows, self.kv.max_len, self._compiled)
                self.graphs[rows] = CapturedStep(step, pool)
        log.info("captured decode graphs for batch sizes %s", sorted(self.graphs))

    @torch.inference_mode()
    def decode(self) -> tuple[list[Decision], torch.Tensor, torch.Tensor]:
        """One step for every decoding stream: (decisions, positive hidden, negative hidden) in row order."""
        n = self.decoding_count
        if n == 0:
            return [], torch.empty(0), torch.empty(0)
        if self.graphs:
            rows = bucket_for(n, self.kv.slots)
            hidden, logits = self.graphs[rows].replay()
        else:
            longest = max(s.positive_len for s in self.streams[:n]) + 1  # the longest branch
            hidden, logits = self._decode_rows(n, self._keys(longest))
        choice = logits[:n].argmax(dim=-1).tolist()
        decisions = [
            self._decide(stream, row, self.token_ids[choice[row]]) for row, stream in enumerate(self.streams[:n])
        ]
        b = BRANCHES
        return decisions, hidden[POSITIVE : b * n : b], hidden[NEGATIVE : b * n : b]

    def _decide(self, stream: LMStream, row: int, token: int) -> Decision:
        """The model's choice, unless the stream's options or limits decide first."""
        finish = FINISH_EOS if token == self.eos_token_id else None
        if stream.fixed_frames:
            done = stream.frames >= stream.fixed_frames
            token = self.eos_token_id if done else self.audio_token_id
            finish = FINISH_FIXED_FRAMES if done else None
        elif stream.frames >= stream.max_frames and finish is None:
            token, finish = self.eos_token_id, FINISH_MAX_FRAMES
        elif stream.positive_len + 1 >= self.max_positions and finish is None:
            # The next step would have no position left to write: stop here.
            token, finish = self.eos_token_id, FINISH_CONTEXT
        return Decision(stream, row, token, token == self.audio_token_id, finish)

    @torch.inference_mode()
    def accept(self, decisions: list[Decision], speech_embeddings: torch.Tensor | None) -> None:
        """Advance every stream past this step: the next inputs are the frame's embedding or the token's."""
        speech_rows = [d.row for d in decisions if d.speech]
        if len(speech_rows) == len(decisions) and speech_rows == list(range(len(decisions))):
            # The usual step, every stream spoke: every branch advances by one, all on the device.
            n = len(decisions)
            self.next_inputs[:n] = speech_embeddings.to(self.device, self.dtype)
            self.token_inputs[:n] = self.audio_token_embedding
            self.positions[:n] += 1
            for d in decisions:
                s = d.stream
                s.positive_len += 1
                s.negative_len += 1
                s.unconditional_len += 1
                s.frames += 1
            return
        going_on = [d for d in decisions if d.finish is None]
        if speech_rows:
            index = torch.tensor(speech_rows, device=self.device)
            self.next_inputs[index] = speech_embeddings.to(self.device, self.dtype)
        if going_on:
            index = torch.tensor([d.row for d in going_on], device=self.device)
            embedded = self.embed_tokens(torch.tensor([d.token for d in going_on], device=self.device))
            self.token_inputs[index] = embedded
            tokens = [i for i, d in enumerate(going_on) if not d.speech]
            if tokens:
                rows = torch.tensor(tokens, device=self.device)
                self.next_inputs[index[rows]] = embedded[rows]
        for d in going_on:
            s = d.stream
            s.positive_len += 1
            s.unconditional_len += 1
            if d.speech:
                s.negative_len += 1
                s.frames += 1
            elif d.token == self.audio_bos_token_id:
                # A new speech segment: the negative branch starts again from nothing.
                s.negative_len = 0
                s.segment += 1
        if going_on:
            rows = torch.tensor([d.row for d in going_on], device=self.device)
            lengths = [[d.stream.positive_len, d.stream.negative_len, d.stream.unconditional_len] for d in going_on]
            self.positions[rows] = torch.tensor(lengths, dtype=torch.long).to(self.device, non_blocking=True)

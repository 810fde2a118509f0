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

A resumed stream (a job going on from its checkpoint) is prefilled from the steps it took before instead of its
prompt alone, to the positions an uninterrupted run holds after them (services/llm/prefill_plan.py).

Stream state lives in persistent device buffers indexed by slot (next inputs, branch lengths, guidance), so
the decode step has fixed shapes per batch bucket and is captured as a CUDA graph on the GPU. Keys and
values live in pages (`services/llm/paged_kv.py`, `services/llm/block_manager.py`): a stream holds pages for
the positions its branches have, admission reserves what it is expected to need, and when the pool runs out
the stream with the most audio ahead of its playback is swapped to host memory and resumed later, with
identical audio.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModel

from services.common.checkpoint import Checkpoint, load_module, parameter_count, read_tensors
from services.common.cuda_graphs import CapturedStep, bucket_for, buckets_up_to
from services.common.errors import CheckpointError
from services.common.frames import FRAMES_PER_SECOND
from services.common.stream_size import expected_branch_positions
from services.common.tensors import device_tensor, to_device
from services.llm import memory_plan
from services.llm.block_manager import SCRATCH_PAGE, BlockManager, StreamPages
from services.llm.decoder import PagedDecoder
from services.llm.memory_plan import BRANCHES, KVShape, planned_pages
from services.llm.paged_kv import PAGE_SIZE, PagedKV
from services.llm.piece_graphs import PieceGraphs, graphed
from services.llm.prefill_plan import (
    NEGATIVE,
    POSITIVE,
    UNCONDITIONAL,
    PrefillPlan,
    PromptEmbeddings,
    StepHistory,
    new_stream,
    resumed_stream,
)

# Prompt chunks a step while no stream is decoding (one while streams play): one piece, which replays the piece
# graphs (`services/llm/piece_graphs.py`). Fewer, longer steps brought a lone prompt's first frame sooner when
# pieces were launched (45-minute prompt, 1.5B, H100: 268 ms at 4, 202 ms at 8). 8 keeps a piece's activations
# (estimated at 0.6 GiB for 7B) inside the activation reserve of `memory_plan`.
IDLE_PREFILL_CHUNKS = 8
CPU_KV_BYTES = 256 * 2**20  # the pool on the CPU at least, where there is no GPU budget to plan from

log = logging.getLogger(__name__)

KEY_BLOCK = 256  # eager attention reads keys up to the next multiple of this


@dataclass(eq=False)  # compared by identity: two identical requests are two streams
class LMStream:
    prompt_ids: list[int]
    voice_embeddings: torch.Tensor | None
    fixed_frames: int  # a test and benchmark option: exactly this many frames, whatever the model chooses
    max_frames: int
    cfg_scale: float = 1.3
    expected_frames: int = 0  # the caller's estimate, for the pages reserved at admission (0: from the prompt)
    frames: int = 0
    segment: int = 0
    slot: int | None = None
    history: StepHistory | None = None  # a resumed stream: the steps it took before, which it is rebuilt from
    prefilled: int = 0  # positions of `plan` written to the KV cache
    positive_len: int = 0
    negative_len: int = 0
    unconditional_len: int = 0
    plan: PrefillPlan | None = None  # from admission until it is prefilled
    ready: bool = False  # prefilled: it decodes unless swapped out
    # The tokens other than speech chosen since the last frame, and those that came before the last frame
    # (what a resume replays).
    tokens_since_frame: list[int] = field(default_factory=list)
    tokens_before_frame: list[int] = field(default_factory=list)
    pages: StreamPages | None = None
    # While preempted: the pages each branch held, and their keys and values (every layer) on the host.
    swapped: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    first_frame_at: float | None = None
    starved: bool = False  # alone, it needs more pages than the pool has: it ends at the next step
    held: bool = False  # its consumer is far behind: it sits out the steps, keeping its pages (`LMEngine.hold`)

    @property
    def decoding(self) -> bool:
        return self.ready and self.swapped is None and not self.held

    @property
    def lengths(self) -> tuple[int, int, int]:
        return self.positive_len, self.negative_len, self.unconditional_len

    def slack_s(self, now: float) -> float:
        """Seconds of audio made ahead of real-time playback from the first frame (how long it can wait)."""
        if self.first_frame_at is None:
            return 0.0
        return self.frames / FRAMES_PER_SECOND - (now - self.first_frame_at)


# Why a stream ended: the model's own end-of-sequence, or a limit that stopped it first.
FINISH_EOS = "eos"
FINISH_FIXED_FRAMES = "fixed_frames"
FINISH_MAX_FRAMES = "max_frames"  # the request's frame budget (max_audio_seconds)
FINISH_CONTEXT = "context"  # the stream's positions reached the end of the context
FINISH_MAX_NEW_TOKENS = "max_new_tokens"  # the checkpoint's generation config caps the tokens a stream makes


@dataclass(eq=False)
class Decision:
    stream: LMStream
    row: int  # the stream's slot: its row in the engine's buffers (from 0 in a plain step's batch)
    token: int
    speech: bool  # a speech frame: its conditions go to the acoustic side
    finish: str | None = None  # set when the stream ends at this step


class LMEngine:
    def __init__(
        self,
        ckpt: Checkpoint,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_streams: int = 256,
        max_context: int | None = None,
        kv_pages: int | None = None,
        prefill_chunk: int = 512,
        page_size: int = PAGE_SIZE,
        memory_fraction: float = 0.9,
        cuda_graphs: bool = True,
        torch_compile: bool = False,
        prefill_graphs: bool = True,
        idle_prefill_chunks: int = IDLE_PREFILL_CHUNKS,
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
        # transformers' loading: the file's head if it has one (even where the config says tied), else the tied
        # embeddings; an untied config without a head would get a random one there, so it is refused here.
        head = tensors.get("lm_head.weight")
        if head is None and not cfg.tie_word_embeddings:
            raise CheckpointError(f"{ckpt.path}: no lm_head.weight in its weights, and its config does not tie it")
        if head is None:
            head = tensors["model.language_model.embed_tokens.weight"]
        self.head_rows = head[self.token_ids].to(self.device, dtype)
        self.audio_token_id = cfg.audio_token_id
        self.audio_bos_token_id = cfg.audio_bos_token_id
        self.eos_token_id = cfg.eos_token_id
        self.max_new_tokens = ckpt.max_new_tokens  # generate() stops after this many new tokens
        if self.max_new_tokens is not None:
            log.info("streams end after %d new tokens (the checkpoint's generation config)", self.max_new_tokens)
        self.hidden = text.hidden_size
        self.prefill_chunk = prefill_chunk
        self.idle_prefill_chunks = idle_prefill_chunks  # at most this many: the chunk buffers are sized for it

        # Memory is planned here, once: a pool of KV pages for every branch of every stream, from the budget.
        max_len = min(max_context or text.max_position_embeddings, text.max_position_embeddings)
        head_dim = self.lm.layers[0].self_attn.head_dim
        self.max_streams = max_streams
        self.kv_shape = KVShape(
            text.num_hidden_layers, text.num_key_value_heads, head_dim, torch.empty((), dtype=dtype).element_size()
        )
        self.page_bytes = self.kv_shape.page_bytes(page_size)
        ceiling = memory_plan.ceiling_pages(max_streams, max_len, page_size)
        pages = min(kv_pages or memory_plan.cpu_pages(self.page_bytes, max_len, page_size, CPU_KV_BYTES), ceiling)
        if self.device.type == "cuda" and kv_pages is None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            in_use = torch.cuda.memory_allocated(self.device)
            pages = planned_pages(total, memory_fraction, in_use, self.page_bytes, ceiling)
        self.blocks = BlockManager(pages, page_size, BRANCHES)
        self.kv = PagedKV(
            text.num_hidden_layers,
            text.num_key_value_heads,
            head_dim,
            pages,
            BRANCHES * max_streams,
            max_len,
            self.device,
            dtype,
            page_size,
        )
        self.decoder = PagedDecoder(self.lm, self.kv)
        self.max_positions = max_len - 1
        self.vocab_size = text.vocab_size
        self.preemptions = 0
        log.info(
            "KV pool: %d pages of %d positions (%.2f GiB), batches of up to %d streams, %d positions per stream",
            pages,
            page_size,
            pages * self.page_bytes / 2**30,
            max_streams,
            max_len,
        )

        # By slot: decoding streams first, then those being prefilled or swapped out.
        self.streams: list[LMStream] = []
        slots = max_streams
        self.next_inputs = torch.zeros(slots, self.hidden, device=self.device, dtype=dtype)  # both CFG branches
        self.token_inputs = torch.zeros(slots, self.hidden, device=self.device, dtype=dtype)  # unconditional
        self.guidance = torch.ones(slots, 1, device=self.device, dtype=torch.float32)
        # The position each branch writes next; rows of no stream write position 0 of the scratch page.
        self.positions = torch.zeros((slots, BRANCHES), device=self.device, dtype=torch.long)
        # A step decodes the slots [first_row, first_row + rows); its first live_rows KV rows are its streams'.
        self.first_row = torch.zeros((), device=self.device, dtype=torch.long)
        self.live_rows = torch.zeros((), device=self.device, dtype=torch.long)
        self._counting = torch.arange(BRANCHES * slots, device=self.device)
        with torch.inference_mode():
            self.audio_token_embedding = self.embed_tokens(torch.tensor(self.audio_token_id, device=self.device))
        # A prompt chunk's tokens, row, first position and token count live in device buffers, so that a graph
        # can replay any chunk (`_chunk_step`).
        longest = self.piece_tokens = idle_prefill_chunks * prefill_chunk  # a step's prompt tokens, nothing playing
        self.chunk_inputs = torch.zeros(longest, self.hidden, device=self.device, dtype=dtype)
        self.chunk_row = torch.zeros(1, device=self.device, dtype=torch.long)
        self.chunk_start = torch.zeros((), device=self.device, dtype=torch.long)
        self.chunk_tokens = torch.zeros((), device=self.device, dtype=torch.long)
        self._chunk_offsets = torch.arange(longest, device=self.device)
        self.graphs: dict[int, CapturedStep] = {}
        # A captured chunk is padded to `prefill_chunk` queries; `padded_chunks` without the graph runs the same
        # step eagerly (a CPU test of what the graph replays).
        self.padded_chunks = False
        self.chunk_graph: CapturedStep | None = None
        # A whole idle piece (`idle_prefill_chunks` chunks) as graphs between its layers' attention: launched, its
        # thousands of kernels cost the host more than the GPU's work (`services/llm/piece_graphs.py`).
        self.piece_graph: PieceGraphs | None = None
        self._compiled = torch_compile and cuda_graphs and self.device.type == "cuda"
        if self._compiled:
            self.decoder.compile()
        if cuda_graphs and self.device.type == "cuda":
            self._capture_graphs()
        if cuda_graphs and prefill_graphs and self.device.type == "cuda":
            self._capture_chunk_graph()

    # ------------------------------------------------------------------ description

    @property
    def capacity(self) -> int:
        """Streams decoded together at most."""
        return self.max_streams

    def expected_frames(self, stream: LMStream) -> int:
        """The frames admission plans for: fixed ones, or the caller's estimate (two frames per text token of
        the prompt without one), bounded by the stream's frame budget."""
        if stream.fixed_frames:
            return stream.fixed_frames
        text_tokens = len(stream.prompt_ids) - sum(1 for t in stream.prompt_ids if t == self.audio_token_id)
        return min(stream.max_frames, stream.expected_frames or 2 * text_tokens)

    def expected_positions(self, stream: LMStream) -> int:
        """Positions admission reserves for a stream, over its three branches."""
        return sum(expected_branch_positions(len(stream.prompt_ids), self.expected_frames(stream)))

    def expected_pages(self, stream: LMStream) -> int:
        return memory_plan.expected_pages(len(stream.prompt_ids), self.expected_frames(stream), self.blocks.page_size)

    def modules(self) -> dict[str, object]:
        return {"model.language_model": self.lm, "lm_head[special tokens]": self.head_rows}

    def parameter_count(self) -> int:
        return parameter_count(self.modules())

    # ------------------------------------------------------------------ admission and release

    def admit(self, stream: LMStream) -> bool:
        """Give the stream a slot and reserve the pages it is expected to need, if both are free; its prompt is
        prefilled by later `prefill` calls."""
        if len(self.streams) >= self.max_streams:
            return False
        # A stream expected to need more than the whole pool reserves it all, and takes its turn alone.
        stream.pages = self.blocks.admit(min(self.expected_pages(stream), self.blocks.usable))
        if stream.pages is None:
            return False
        stream.slot = len(self.streams)
        self.streams.append(stream)
        self.guidance[stream.slot] = stream.cfg_scale
        # On the scheduler's loop beside a step in flight: nothing here may wait for the device.
        with torch.inference_mode():
            # The voices fill the placeholder positions in order, as the reference's masked_scatter does; the
            # embeddings are made a piece at a time as the prefill reads them.
            places, voices = [], None
            if stream.voice_embeddings is not None:
                places = [i for i, t in enumerate(stream.prompt_ids) if t == self.audio_token_id]
                voices = to_device(stream.voice_embeddings, self.device, self.dtype)
                stream.voice_embeddings = None  # on the device now: its pinned host memory goes back
            ids = device_tensor(stream.prompt_ids, self.device)
            embeds = PromptEmbeddings(ids, self.embed_tokens, places, voices)
            if stream.history is None:
                stream.plan = new_stream(stream.prompt_ids, embeds)
            else:
                stream.plan = resumed_stream(
                    stream.prompt_ids,
                    embeds,
                    stream.history,
                    self.embed_tokens,
                    self.audio_token_id,
                    self.audio_bos_token_id,
                )
                stream.history = None  # the plan holds what its prefill reads; the frames' embeddings can go
        return True

    def _rows(self, slot: int) -> slice:
        return slice(BRANCHES * slot, BRANCHES * slot + BRANCHES)

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        stream = self.streams[src]
        self.kv.move_rows(self._rows(src), self._rows(dst))
        self.next_inputs[dst] = self.next_inputs[src]
        self.token_inputs[dst] = self.token_inputs[src]
        self.guidance[dst] = self.guidance[src]
        self.positions[dst] = self.positions[src]
        self.streams[dst] = stream
        stream.slot = dst

    def _exchange(self, i: int, j: int) -> None:
        """Swap the slots of two streams (through the free slot past the last stream)."""
        if i == j:
            return
        spare = len(self.streams)
        self.streams.append(self.streams[i])
        self._move(i, spare)
        self._move(j, i)
        self._move(spare, j)
        self.streams.pop()

    def release(self, stream: LMStream) -> None:
        """Free the stream's slot and pages, keeping decoding streams packed first and the others after them."""
        if stream.slot is None:
            return
        i, n = stream.slot, self.decoding_count
        if i < n:
            self._move(n - 1, i)
            i = n - 1
        self._move(len(self.streams) - 1, i)
        self.streams.pop()
        last = len(self.streams)
        self.kv.clear_rows(self._rows(last))
        self.positions[last] = 0
        stream.slot = None
        if stream.pages is not None:
            self.blocks.release(stream.pages)
        stream.swapped = None

    def hold(self, stream: LMStream) -> None:
        """Take a decoding stream out of the steps, keeping its slot's state and its pages, until `unhold`: what
        it makes would only wait for a consumer that is far behind. Its audio does not change."""
        assert stream.decoding
        self._exchange(stream.slot, self.decoding_count - 1)  # the last decoding slot, then past them
        stream.held = True

    def unhold(self, stream: LMStream) -> None:
        """Let a held stream decode again; one swapped out meanwhile decodes once it is swapped back in."""
        assert stream.held
        stream.held = False
        if stream.swapped is None:
            self._became_decoding(stream)

    def _became_decoding(self, stream: LMStream) -> None:
        """Move a stream that just became ready (prefilled or swapped back in) to the end of the decoding rows."""
        n = self.decoding_count  # counts this stream already
        self._exchange(stream.slot, n - 1)

    # ------------------------------------------------------------------ pages

    def _grow(self, stream: LMStream, branch: int, positions: int) -> bool:
        """Pages for the first `positions` positions of a branch, written into the page table; False when the
        pool has none the stream may take."""
        new = self.blocks.grow(stream.pages, branch, positions)
        if new is None:
            return False
        row = BRANCHES * stream.slot + branch
        self.kv.set_pages([(row, index, page) for index, page in new])
        return True

    def _restart_negative(self, stream: LMStream) -> None:
        """audio_bos: the negative branch keeps only the page its next position (0) is written to."""
        held = stream.pages.branches[NEGATIVE]
        row = BRANCHES * stream.slot + NEGATIVE
        self.kv.set_pages([(row, index, SCRATCH_PAGE) for index in range(1, len(held))])
        self.blocks.shrink(stream.pages, NEGATIVE, 1)

    def make_room(self) -> list[LMStream]:
        """Pages for the position every decoding stream writes next. When the pool has none left, take them
        back from prompts still being prefilled (they are prefilled again later), then swap out held streams
        (their consumers are far behind), then the streams with the most audio ahead of playback, until every
        stream left can step. A stream alone that the whole pool cannot hold ends at this step
        (`FINISH_CONTEXT`). Returns the streams swapped out by this call."""
        swapped = []
        while True:
            decoding = self.streams[: self.decoding_count]
            short = next((s for s in decoding if not s.starved and not self._grow_next(s)), None)
            if short is None:
                return swapped
            prefilling = [s for s in self.streams[self.decoding_count :] if s.plan is not None and s.prefilled]
            held = [s for s in self.streams if s.held and s.swapped is None]
            if prefilling:
                self._restart_prefill(prefilling[-1])
            elif held:
                self._swap_out(held[-1])
                swapped.append(held[-1])
            elif len(decoding) > 1:
                now = time.monotonic()
                victim = max(decoding, key=lambda s: s.slack_s(now))
                self._swap_out(victim)
                swapped.append(victim)
            else:
                short.starved = True
                log.warning("stream at positions %s fills the whole KV pool: it ends here", short.lengths)

    def place(self, stream: LMStream, lengths: tuple[int, int, int]) -> None:
        """Benchmarks: put a decoding stream at these branch lengths, as if it had run there, with pages for
        them (their keys and values are whatever the pages held). Step costs then match a stream that far
        into its script without generating it."""
        assert stream.decoding and stream.slot is not None
        for branch, n in enumerate(lengths):
            if not self._grow(stream, branch, n + 1):
                raise RuntimeError(f"the KV pool has no room for a stream at positions {lengths}")
        stream.positive_len, stream.negative_len, stream.unconditional_len = lengths
        self.positions[stream.slot] = device_tensor(lengths, self.device)

    def _prompt_fits(self, stream: LMStream) -> bool:
        """Whether the pool can give the stream pages for its whole prefill now (its reservation or free pages), so
        that a prefill started under a full pool is not undone by the next decode step's `make_room`."""
        needed = sum(self.blocks.pages_for(n) for n in stream.plan.lengths)
        return needed - stream.pages.held <= stream.pages.reserved + self.blocks.available

    def _grow_next(self, stream: LMStream) -> bool:
        return all(self._grow(stream, branch, n + 1) for branch, n in enumerate(stream.lengths))

    def _restart_prefill(self, stream: LMStream) -> None:
        log.warning("KV pool full: a prompt's prefill (%d tokens so far) gives its pages back", stream.prefilled)
        self.kv.clear_rows(self._rows(stream.slot))
        for branch in range(BRANCHES):
            self.blocks.shrink(stream.pages, branch, 0)
        stream.prefilled = 0
        self.preemptions += 1

    def _swap_out(self, stream: LMStream) -> None:
        held = [page for branch in stream.pages.branches for page in branch]
        stream.swapped = [len(b) for b in stream.pages.branches], self.kv.copy_out(held)
        self.preemptions += 1
        log.warning(
            "KV pool full: stream at positions %s swapped to host memory (%d pages; %d preemptions so far)",
            stream.lengths,
            len(held),
            self.preemptions,
        )
        self._exchange(stream.slot, self.decoding_count)  # it no longer counts as decoding: move it past them
        self.kv.clear_rows(self._rows(stream.slot))
        self.blocks.release(stream.pages)

    def _swap_in(self, stream: LMStream) -> bool:
        counts, saved = stream.swapped
        pages = self.blocks.admit(sum(counts))
        if pages is None:
            return False
        stream.pages = pages
        for branch, count in enumerate(counts):
            self._grow(stream, branch, count * self.blocks.page_size)
        self.kv.copy_in([page for branch in pages.branches for page in branch], saved)
        stream.swapped = None
        self._became_decoding(stream)
        log.info("stream at positions %s swapped back in", stream.lengths)
        return True

    @property
    def decoding_count(self) -> int:
        return sum(1 for s in self.streams if s.decoding)

    # ------------------------------------------------------------------ prefill

    def _keys(self, upto: int) -> int:
        return min(self.kv.max_len, -(-upto // KEY_BLOCK) * KEY_BLOCK)

    @torch.inference_mode()
    def prefill(self, budget: int | None = None) -> list[LMStream]:
        """Resume swapped-out streams for which pages are free, then write up to `budget` prompt tokens (default:
        one chunk) into the KV cache; returns the streams whose prompts became ready."""
        for stream in [s for s in self.streams if s.swapped is not None and not s.held]:
            if not self._swap_in(stream):
                break  # in slot order: a later stream does not overtake one that waits for pages
        ready = []
        # With nothing playing, no step waits on the prefill: more chunks a step bring the first audio sooner.
        chunk = self.prefill_chunk * (1 if self.decoding_count else self.idle_prefill_chunks)
        budget = chunk if budget is None else budget
        # Padded (the graphs), a step with nothing playing takes whole pieces while a piece's worth is left, and
        # chunks after that; launched (no graphs), exactly its tokens up to the step's chunk.
        launched = not self.padded_chunks
        piece = self.piece_tokens if not self.decoding_count else self.prefill_chunk
        for stream in [s for s in self.streams[self.decoding_count :] if s.plan is not None]:
            if budget <= 0:
                break
            plan = stream.plan
            target = plan.positions
            if stream.prefilled == 0 and not self._prompt_fits(stream):
                break  # a prompt that gave its pages back starts again only when the whole of it fits
            while stream.prefilled < target and budget > 0:
                branch, inputs, a = plan.locate(stream.prefilled)
                left = min(len(inputs) - a, budget)
                if launched:
                    b, queries = a + min(left, chunk), None
                elif left >= piece:
                    b, queries = a + piece, piece
                else:
                    b, queries = a + min(left, self.prefill_chunk), self.prefill_chunk
                if not self._grow(stream, branch, b):
                    return ready  # the pool is full: the running streams come first
                self._write_chunk(inputs[a:b], BRANCHES * stream.slot + branch, a, queries)
                stream.prefilled, budget = stream.prefilled + (b - a), budget - (b - a)
            if stream.prefilled == target:
                # The first step's input for every branch: a new stream's is the prompt's last token (audio_bos),
                # which the unconditional branch reads as a token id, like every token after it.
                self.next_inputs[stream.slot] = plan.next_input
                self.token_inputs[stream.slot] = self.embed_tokens(device_tensor(plan.next_token, self.device))
                stream.positive_len, stream.negative_len, stream.unconditional_len = plan.lengths
                stream.frames, stream.segment = plan.frames, plan.segment
                self.positions[stream.slot] = device_tensor(plan.lengths, self.device)
                stream.plan = None
                stream.ready = True
                self._became_decoding(stream)
                ready.append(stream)
        return ready

    def _write_chunk(self, inputs: torch.Tensor, row: int, start: int, queries: int | None) -> None:
        """The keys and values of `inputs` (tokens, hidden), KV row `row`'s positions from `start` on. `queries`:
        a padded step of that many (a chunk or a piece: the graph's replay where it exists); None: exactly its
        tokens as one launched step."""
        tokens = inputs.shape[0]
        self.chunk_inputs[:tokens] = inputs
        self.chunk_row.fill_(row)
        self.chunk_start.fill_(start)
        self.chunk_tokens.fill_(tokens)
        if queries is None:
            self._chunk_step(tokens, start + tokens)
        elif queries == self.piece_tokens and self.piece_graph is not None:
            self.piece_graph.run(start)
        elif queries == self.prefill_chunk and self.chunk_graph is not None:
            self.chunk_graph.replay()
        else:
            self._chunk_step(queries, self._keys(start + tokens), padded=True)

    def _chunk_step(self, queries: int, keys: int | None, padded: bool = False, compiled: bool = False) -> torch.Tensor:
        """The prompt chunk the buffers hold, as `queries` queries over its row's first `keys` positions.

        Launched (on every device without the chunk graph), it has exactly its tokens as queries and the
        positions up to its last as keys, attended with an implicit causal mask. `padded`: `queries` is the full
        chunk size, and the queries past its tokens are padding that writes to the scratch page. With `keys`
        None (what the chunk graph captures) the keys are read through the row's page table up to each query's
        position, so one graph serves every chunk; with `keys` (the same step eagerly, where Triton is absent)
        they are gathered, the keys past the chunk masked out. `compiled`: the layers' other parts compiled, as in the
        decode graphs."""
        offsets = self._chunk_offsets[:queries]
        real = offsets < self.chunk_tokens
        positions = (self.chunk_start + torch.where(real, offsets, 0))[None]
        x = self.chunk_inputs[None, :queries]
        return self.decoder.forward(
            x, self.chunk_row, positions, keys, compiled, writes=real[None], prompt_chunk=not padded
        )

    def _capture_chunk_graph(self) -> None:
        self.padded_chunks = True
        # Not the decode graphs' pool: their outputs outlive a chunk. The chunk and piece graphs share one: a
        # prefill keeps nothing of theirs between replays.
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            # A context shorter than a piece never has a whole one left (and its page tables could not index it).
            if self.prefill_chunk < self.piece_tokens <= self.kv.max_len:
                inputs = self.chunk_inputs[None, : self.piece_tokens]
                self.piece_graph = PieceGraphs(
                    self.decoder, inputs, self.chunk_row, self.chunk_start, graphed(pool), self._compiled
                )
            step = functools.partial(self._chunk_step, self.prefill_chunk, None, padded=True, compiled=self._compiled)
            self.chunk_graph = CapturedStep(step, pool)
        log.info(
            "captured the prompt-chunk graphs: %d and %d tokens at any position", self.prefill_chunk, self.piece_tokens
        )

    # ------------------------------------------------------------------ decode

    def _decode_rows(self, rows: int, keys: int | None, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of `rows` slots from `first_row` on: (hidden states of every branch row, guided scores (rows,
        4)). `keys`: gather that many positions per row; None: read each row's own pages (the captured graphs)."""
        # The slots come from a device scalar, so one graph per bucket serves a batch at any offset (the two
        # halves of a pipelined step). Padding slots past the last are clamped to it; they write nothing.
        slots = (self.first_row + self._counting[:rows]).clamp(max=self.max_streams - 1)
        branches = [None] * BRANCHES
        branches[POSITIVE] = branches[NEGATIVE] = self.next_inputs[slots]
        branches[UNCONDITIONAL] = self.token_inputs[slots]
        x = torch.stack(branches, dim=1).reshape(BRANCHES * rows, 1, self.hidden)
        positions = self.positions[slots].reshape(BRANCHES * rows, 1)
        kv_rows = (BRANCHES * slots[:, None] + self._counting[:BRANCHES]).reshape(-1)
        # A fixed-size batch also steps the rows past this step's streams; some belong to other streams or to
        # prompts still being prefilled, whose pages hold their keys: those rows write to the scratch page instead.
        live = self._counting[: BRANCHES * rows] < self.live_rows
        hidden = self.decoder.forward(x, kv_rows, positions, keys, compiled, live)[:, 0]
        positive = (hidden[POSITIVE::BRANCHES] @ self.head_rows.T).float()
        unconditional = (hidden[UNCONDITIONAL::BRANCHES] @ self.head_rows.T).float()
        g = self.guidance[slots]
        return hidden, g * positive + (1 - g) * unconditional

    def _capture_graphs(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # outputs are consumed before the next replay
        for rows in buckets_up_to(self.max_streams):
            with torch.inference_mode():
                step = functools.partial(self._decode_rows, rows, None, self._compiled)
                self.graphs[rows] = CapturedStep(step, pool)
        log.info("captured decode graphs for batch sizes %s", sorted(self.graphs))

    @torch.inference_mode()
    def decode(self, rows: range | None = None) -> tuple[list[Decision], torch.Tensor, torch.Tensor]:
        """One step for the decoding streams in slots `rows` (default: all of them): (decisions, positive hidden,
        negative hidden) in row order. A pipelined step decodes two halves of the slots one after the other."""
        self.make_room()
        rows = range(self.decoding_count) if rows is None else rows
        assert rows.step == 1 and rows.stop <= self.decoding_count, f"{rows} are not decoding slots"
        n, first = len(rows), rows.start
        if n == 0:
            return [], torch.empty(0), torch.empty(0)
        self.first_row.fill_(first)
        self.live_rows.fill_(BRANCHES * n)
        streams = self.streams[first : first + n]
        if self.graphs:
            hidden, logits = self.graphs[bucket_for(n, self.max_streams)].replay()
        else:
            longest = max(s.positive_len for s in streams) + 1  # the longest branch
            hidden, logits = self._decode_rows(n, self._keys(longest))
        choice = logits[:n].argmax(dim=-1).tolist()
        decisions = [self._decide(stream, first + i, self.token_ids[choice[i]]) for i, stream in enumerate(streams)]
        b = BRANCHES
        return decisions, hidden[POSITIVE : b * n : b], hidden[NEGATIVE : b * n : b]

    def _decide(self, stream: LMStream, row: int, token: int) -> Decision:
        """The model's choice, unless the stream's options or limits decide first."""
        finish = FINISH_EOS if token == self.eos_token_id else None
        if stream.fixed_frames:
            done = stream.frames >= stream.fixed_frames
            token = self.eos_token_id if done else self.audio_token_id
            finish = FINISH_FIXED_FRAMES if done else None
        elif self.max_new_tokens is not None and stream.unconditional_len >= self.max_new_tokens and finish is None:
            # The unconditional branch holds one position per token chosen so far: generate() made its last.
            token, finish = self.eos_token_id, FINISH_MAX_NEW_TOKENS
        elif stream.frames >= stream.max_frames and finish is None:
            token, finish = self.eos_token_id, FINISH_MAX_FRAMES
        elif (stream.positive_len + 1 >= self.max_positions or stream.starved) and finish is None:
            # The next step would have no position left to write: stop here.
            token, finish = self.eos_token_id, FINISH_CONTEXT
        return Decision(stream, row, token, token == self.audio_token_id, finish)

    @torch.inference_mode()
    def accept(self, decisions: list[Decision], speech_embeddings: torch.Tensor | None) -> None:
        """Advance every stream past this step: the next inputs are the frame's embedding or the token's."""
        speech_rows = [d.row for d in decisions if d.speech]
        first = decisions[0].row if decisions else 0
        if len(speech_rows) == len(decisions) and speech_rows == list(range(first, first + len(decisions))):
            # The usual step, every stream spoke: every branch advances by one, all on the device.
            spoke = slice(first, first + len(decisions))
            self.next_inputs[spoke] = speech_embeddings.to(self.device, self.dtype)
            self.token_inputs[spoke] = self.audio_token_embedding
            self.positions[spoke] += 1
            for d in decisions:
                s = d.stream
                s.positive_len += 1
                s.negative_len += 1
                s.unconditional_len += 1
                s.frames += 1
                s.tokens_before_frame, s.tokens_since_frame = s.tokens_since_frame, []
            self._first_frames(decisions)
            return
        going_on = [d for d in decisions if d.finish is None]
        if speech_rows:
            index = device_tensor(speech_rows, self.device)
            self.next_inputs[index] = speech_embeddings.to(self.device, self.dtype)
        if going_on:
            index = device_tensor([d.row for d in going_on], self.device)
            embedded = self.embed_tokens(device_tensor([d.token for d in going_on], self.device))
            self.token_inputs[index] = embedded
            tokens = [i for i, d in enumerate(going_on) if not d.speech]
            if tokens:
                rows = device_tensor(tokens, self.device)
                self.next_inputs[index[rows]] = embedded[rows]
        for d in going_on:
            s = d.stream
            s.positive_len += 1
            s.unconditional_len += 1
            if d.speech:
                s.negative_len += 1
                s.frames += 1
                s.tokens_before_frame, s.tokens_since_frame = s.tokens_since_frame, []
                continue
            s.tokens_since_frame.append(d.token)
            if d.token == self.audio_bos_token_id:
                # A new speech segment: the negative branch starts again from nothing.
                s.negative_len = 0
                s.segment += 1
                self._restart_negative(s)
        self._first_frames(decisions)
        if going_on:
            rows = device_tensor([d.row for d in going_on], self.device)
            lengths = [[d.stream.positive_len, d.stream.negative_len, d.stream.unconditional_len] for d in going_on]
            self.positions[rows] = device_tensor(lengths, self.device)

    @staticmethod
    def _first_frames(decisions: list[Decision]) -> None:
        now = None
        for d in decisions:
            if d.speech and d.stream.first_frame_at is None:
                now = now or time.monotonic()
                d.stream.first_frame_at = now

"""What a stream's three branches read before its first decode step, for a new stream and for a resumed one.

A new stream prefills its prompt but the last token (audio_bos) into the positive branch; that token is the
first step's input for every branch. A resumed stream is rebuilt from every step it took before (its tokens,
and each speech step's frame embedding), to exactly the positions an uninterrupted run holds after those
steps (services/llm/engine.py describes the branches):

- positive: the prompt, then every step's input but the last (a frame's embedding after speech, the token's
  embedding otherwise);
- unconditional: the prompt's last token, then every token chosen but the last;
- negative: the inputs of the speech steps since the last audio_bos (the steps that chose it, or speech);

and the next step reads the last step's input (and token). The three are prefilled one after the other in
chunks, through the same paged path as prompts.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.common.tensors import device_tensor
from services.llm.memory_plan import BRANCHES

POSITIVE, NEGATIVE, UNCONDITIONAL = 0, 1, 2


@dataclass(frozen=True)
class StepHistory:
    """Every step a stream took, in order: its tokens (speech steps as the audio token), and per speech step the
    frame's input embedding, (frames, hidden). It ends with a speech step."""

    tokens: list[int]
    frame_embeddings: torch.Tensor


@dataclass(frozen=True)
class PromptEmbeddings:
    """A prompt's input embeddings, made a piece at a time as its prefill reads them (`prompt[a:b]`): the token
    embeddings, with the voices' embeddings at the placeholder positions, in order, as the reference's
    masked_scatter places them. A 45-minute prompt's embeddings held whole would be 38 MB (1.5B) for as long as
    its prefill runs, on top of the step's own activations; its ids and voices are a few."""

    ids: torch.Tensor  # (n,) on the device
    embed_tokens: Callable[[torch.Tensor], torch.Tensor]
    places: list[int]  # the voice placeholders' positions, ascending
    voices: torch.Tensor | None  # (len(places), hidden), on the device

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, piece: slice) -> torch.Tensor:
        a, b, step = piece.indices(len(self))
        assert step == 1, "pieces are contiguous"
        embeds = self.embed_tokens(self.ids[a:b])
        first, last = bisect.bisect_left(self.places, a), bisect.bisect_left(self.places, b)
        if last > first:
            at = device_tensor([p - a for p in self.places[first:last]], embeds.device)
            embeds.index_copy_(0, at, self.voices[first:last])
        return embeds

    def first(self, n: int) -> PromptEmbeddings:
        """The first `n` positions."""
        kept = bisect.bisect_left(self.places, n)
        voices = self.voices[:kept] if self.voices is not None else None
        return PromptEmbeddings(self.ids[:n], self.embed_tokens, self.places[:kept], voices)


Inputs = torch.Tensor | PromptEmbeddings  # (n, hidden), sliced by pieces


@dataclass
class PrefillPlan:
    parts: list[tuple[int, Inputs]]  # (branch, inputs (n, hidden) it writes from position 0), in order
    next_input: torch.Tensor  # (hidden,): the positive and negative branches' next input
    next_token: int  # the unconditional branch reads this token's embedding next
    frames: int = 0  # frames made before
    segment: int = 0  # audio_bos chosen before

    @property
    def positions(self) -> int:
        return sum(len(inputs) for _, inputs in self.parts)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Positions per branch once prefilled."""
        lengths = [0] * BRANCHES
        for branch, inputs in self.parts:
            lengths[branch] = len(inputs)
        return tuple(lengths)

    def locate(self, done: int) -> tuple[int, Inputs, int]:
        """The part that position `done` of the whole prefill falls in: (branch, inputs, offset within them)."""
        for branch, inputs in self.parts:
            if done < len(inputs):
                return branch, inputs, done
            done -= len(inputs)
        raise IndexError("the prefill is complete")


def new_stream(prompt_ids: list[int], prompt: PromptEmbeddings) -> PrefillPlan:
    n = len(prompt_ids)
    return PrefillPlan([(POSITIVE, prompt.first(n - 1))], prompt[n - 1 : n][0], prompt_ids[-1])


def resumed_stream(
    prompt_ids: list[int],
    prompt: PromptEmbeddings,
    history: StepHistory,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    audio_token_id: int,
    audio_bos_token_id: int,
) -> PrefillPlan:
    tokens = history.tokens
    prompt_embeds = prompt[:]  # the positive branch reads it joined to the steps' inputs
    device = prompt_embeds.device
    token_embeds = embed_tokens(device_tensor(tokens, device))
    speech = device_tensor([t == audio_token_id for t in tokens], device)
    # x[t] is the input of step t: the prompt's last token first, then what each step's choice gave.
    following = token_embeds.clone()
    following[speech] = history.frame_embeddings.to(device, prompt_embeds.dtype)
    inputs = torch.cat([prompt_embeds[-1:], following])
    last_bos = max((t for t, token in enumerate(tokens) if token == audio_bos_token_id), default=-1)
    negative = [t for t in range(last_bos + 1, len(tokens)) if tokens[t] == audio_token_id]
    unconditional = torch.cat([embed_tokens(device_tensor(prompt_ids[-1:], device)), token_embeds[:-1]])
    return PrefillPlan(
        parts=[
            (POSITIVE, torch.cat([prompt_embeds[:-1], inputs[:-1]])),
            (UNCONDITIONAL, unconditional),
            (NEGATIVE, inputs[device_tensor(negative, device, torch.long)]),
        ],
        next_input=inputs[-1],
        next_token=tokens[-1],
        frames=sum(1 for t in tokens if t == audio_token_id),
        segment=sum(1 for t in tokens if t == audio_bos_token_id),
    )

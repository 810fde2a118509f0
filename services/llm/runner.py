"""Executing one step's plan: the engine's prefill and decode, the acoustic side's render, the engine's accept.

The scheduler (`services/llm/scheduler.py`) decides what a step does and hands it over as a `StepPlan`, a value
that holds no tensors; `StepRunner.step` does it and answers with a `StepOutput`. The llm's step loop and
the benchmarks call the same `step`.

A plan decodes every decoding stream and waits for their frames (the plain step), or one half of them (a
pipelined step, over a link that can hold two steps in flight): its conditions are sent and left in flight
while the next plan decodes the other half, and the half sent before is received and accepted then:

    decode A, send A | decode B, send B, receive A, accept A | decode A, send A, receive B, accept B | ...

so one half's acoustic round trip overlaps the other half's language-model step. Every stream still steps
once per frame with the embedding of its own last frame, so the tokens and the audio are the plain step's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from services.common.tensors import device_tensor
from services.llm.engine import Decision, LMEngine, LMStream
from services.render.link import OverlappingLink, RenderLink
from services.render.values import RenderResult, RenderStep, StreamSpec

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    joined: list[StreamSpec] = field(default_factory=list)  # admitted since the last step: the acoustic side starts
    ended: list[int] = field(default_factory=list)  # acoustic stream ids released since the last step
    prefill_budget: int | None = None  # prompt tokens this step may prefill (None: the engine's chunk)
    # The decoding slots this step decodes, left in flight (one half of a pipelined step; empty: decode nothing,
    # only collect the half in flight). None: every decoding stream, rendered before the step returns.
    rows: range | None = None
    # Ask the acoustic side which streams' consumers are behind even if nothing else would go to it (every
    # stream is held, so no step renders).
    ask_behind: bool = False

    @property
    def pipelined(self) -> bool:
        return self.rows is not None


@dataclass
class StepOutput:
    ready: list[LMStream]  # prompts that finished prefilling
    decisions: list[Decision]  # accepted in this step: every decoding stream's (plain) or a half's, in row order
    # Per speaking decision, in order, on the host: its frame's audio (samples,), and its latent and semantic
    # features (what a resume rebuilds from); None where they went from the acoustic side to the consumer.
    audio: list[torch.Tensor | None]
    phase_ms: dict[str, float]
    latents: list[torch.Tensor | None] = field(default_factory=list)
    semantic: list[torch.Tensor | None] = field(default_factory=list)
    # The acoustic side's streams whose audio consumer is behind, as of this step; None: it was not asked.
    behind: list[int] | None = None


def _rows(results: list[RenderResult], part: str) -> list[torch.Tensor | None]:
    """One part of the results' frames, row by row on the host (None for a result that came without it)."""
    rows: list[torch.Tensor | None] = []
    for r in results:
        t = getattr(r, part)
        rows += [None] * r.embeddings.shape[0] if t is None else list(t.float().cpu())
    return rows


@dataclass
class _Half:
    """Decisions waiting for their render result; what the acoustic side may hold if their message is lost."""

    decisions: list[Decision]
    sent: bool
    at_risk: list[int]


class StepRunner:
    def __init__(self, engine: LMEngine, link: RenderLink) -> None:
        self.engine = engine
        self.link = link
        self.step_index = 0
        # Streams the acoustic side may still hold after a failed step: released with the next message.
        self.orphans: set[int] = set()
        self.in_flight: _Half | None = None  # the pipelined half whose result has not been received
        self.pipelined_halves = 0  # halves sent and left in flight, over the runner's life

    @property
    def can_pipeline(self) -> bool:
        """Whether the link can hold a half in flight now (over the wire, tensors in the messages)."""
        return isinstance(self.link, OverlappingLink) and self.link.overlaps

    async def abandon(self) -> None:
        """After a failed step: forget the half in flight (its streams are failed with the rest) and the render
        stream its result would have come on."""
        if self.in_flight is not None:
            self.orphans.update(self.in_flight.at_risk)
            self.in_flight = None
            await self.link.close()

    async def step(self, plan: StepPlan, stream_ids: dict[int, int]) -> StepOutput:
        """One step. `stream_ids` maps id(LMStream) to its acoustic stream id."""
        if plan.pipelined and not isinstance(self.link, OverlappingLink):
            raise ValueError("a pipelined plan needs a link that can hold a step in flight")
        if not plan.pipelined and self.in_flight is not None:
            raise ValueError("a plain step while a pipelined half is in flight: collect it first (rows=range(0))")

        def compute():
            ready = self.engine.prefill(plan.prefill_budget)
            prefilled = time.perf_counter()
            if plan.rows is not None and not plan.rows:
                return ready, prefilled, [], None, None
            return ready, prefilled, *self.engine.decode(plan.rows)

        t0 = time.perf_counter()
        ready, prefilled, decisions, positive, negative = await asyncio.to_thread(compute)
        t1 = time.perf_counter()
        speech = [d for d in decisions if d.speech]
        if speech and len(speech) != len(decisions):
            first = decisions[0].row
            rows = device_tensor([d.row - first for d in speech], positive.device)
            positive, negative = positive.index_select(0, rows), negative.index_select(0, rows)
        ids = [stream_ids[id(d.stream)] for d in speech]
        ends = plan.ended + [stream_ids[id(d.stream)] for d in decisions if d.finish is not None]
        message, at_risk = None, []
        if plan.joined or ids or ends or self.orphans or plan.ask_behind:
            # Only a step that changes the acoustic side talks to it; a step in which every stream chose
            # audio_bos or audio_eos is the llm's alone.
            orphans, self.orphans = sorted(self.orphans), set()
            message = RenderStep(
                self.step_index,
                plan.joined,
                ids,
                positive if ids else None,
                negative if ids else None,
                orphans + ends,
            )
            self.step_index += 1
            # Whatever this message carries may or may not reach the acoustic side if the step fails.
            at_risk = orphans + ends + [s.stream_id for s in plan.joined]
        current = _Half(decisions, message is not None, at_risk)
        previous, self.in_flight = self.in_flight, None
        try:
            if not plan.pipelined:
                result = await self.link.step(message) if message is not None else RenderResult()
                t2 = time.perf_counter()
                accepted = [(current, result)]
            else:
                accepted = await self._pipelined(current, previous, message)
                t2 = time.perf_counter()
            for half, result in accepted:
                if half.decisions:
                    await asyncio.to_thread(self.engine.accept, half.decisions, result.embeddings)
        except BaseException:
            for half in (previous, current):
                if half is not None:
                    self.orphans.update(half.at_risk)
            if plan.pipelined:
                # A result may be left unread on the stream: start the next step on a fresh one.
                self.in_flight = None
                await self.link.close()
            raise
        t3 = time.perf_counter()
        speaking = [result for half, result in accepted if any(d.speech for d in half.decisions)]
        audio, latents, semantic = (_rows(speaking, part) for part in ("audio", "latents", "semantic"))
        phases = {
            # Prefill's GPU work may end inside decode, whose choice copy waits for the device.
            "prefill": (prefilled - t0) * 1000,
            "decode": (t1 - prefilled) * 1000,
            "render": (t2 - t1) * 1000,
            "accept": (t3 - t2) * 1000,
            "to host": (time.perf_counter() - t3) * 1000,
        }
        decided = [d for half, _ in accepted for d in half.decisions]
        reports = [result.behind for _, result in accepted if result.behind is not None]
        return StepOutput(ready, decided, audio, phases, latents, semantic, reports[-1] if reports else None)

    async def _pipelined(
        self, current: _Half, previous: _Half | None, message: RenderStep | None
    ) -> list[tuple[_Half, RenderResult]]:
        """Send this half, collect the half sent before it; this half stays in flight if it has decisions."""
        if message is not None:
            await self.link.send(message)
        accepted = []
        if previous is not None:
            accepted.append((previous, await self.link.receive() if previous.sent else RenderResult()))
        if current.sent and current.decisions:
            self.in_flight = current
            if self.pipelined_halves == 0:
                log.info("render steps pipelined: two halves of the batch, one in flight while the other decodes")
            self.pipelined_halves += 1
        else:
            accepted.append((current, await self.link.receive() if current.sent else RenderResult()))
        return accepted

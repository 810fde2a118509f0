"""Executing one step's plan: the engine's prefill and decode, the acoustic side's render, the engine's accept.

The scheduler (`services/llm/scheduler.py`) decides what a step does and hands it over as a `StepPlan`, a value
that holds no tensors; `StepRunner.step` does it and answers with a `StepOutput`. The llm's step loop and
the benchmarks call the same `step`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from services.llm.engine import Decision, LMEngine, LMStream
from services.render.link import RenderLink
from services.render.values import RenderStep, StreamSpec


@dataclass
class StepPlan:
    joined: list[StreamSpec] = field(default_factory=list)  # admitted since the last step: the acoustic side starts
    ended: list[int] = field(default_factory=list)  # acoustic stream ids released since the last step
    prefill_budget: int | None = None  # prompt tokens this step may prefill (None: the engine's chunk)


@dataclass
class StepOutput:
    ready: list[LMStream]  # prompts that finished prefilling
    decisions: list[Decision]  # every decoding stream's, in row order
    audio: torch.Tensor | None  # (speaking streams, samples) on the host, in the order of the speaking decisions
    phase_ms: dict[str, float]
    # The frames' latents and semantic features on the host, in the same order: what a resume rebuilds from.
    latents: torch.Tensor | None = None
    semantic: torch.Tensor | None = None


class StepRunner:
    def __init__(self, engine: LMEngine, link: RenderLink) -> None:
        self.engine = engine
        self.link = link
        self.step_index = 0
        # Streams the acoustic side may still hold after a failed step: released with the next message.
        self.orphans: set[int] = set()

    async def step(self, plan: StepPlan, stream_ids: dict[int, int]) -> StepOutput:
        """One step. `stream_ids` maps id(LMStream) to its acoustic stream id."""

        def compute():
            ready = self.engine.prefill(plan.prefill_budget)
            return ready, *self.engine.decode()

        t0 = time.perf_counter()
        ready, decisions, positive, negative = await asyncio.to_thread(compute)
        t1 = time.perf_counter()
        speech = [d for d in decisions if d.speech]
        if speech and len(speech) != len(decisions):
            rows = torch.tensor([d.row for d in speech], device=positive.device)
            positive, negative = positive.index_select(0, rows), negative.index_select(0, rows)
        ids = [stream_ids[id(d.stream)] for d in speech]
        ends = plan.ended + [stream_ids[id(d.stream)] for d in decisions if d.finish is not None]
        embeds = audio = latents = semantic = None
        if plan.joined or ids or ends or self.orphans:
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
            try:
                result = await self.link.step(message)
                embeds, audio, latents, semantic = result.embeddings, result.audio, result.latents, result.semantic
            except BaseException:
                # Whatever this message carried may or may not have reached the acoustic side.
                self.orphans.update(orphans + ends + [s.stream_id for s in plan.joined])
                raise
            self.step_index += 1
        t2 = time.perf_counter()
        if decisions:
            await asyncio.to_thread(self.engine.accept, decisions, embeds)
        t3 = time.perf_counter()
        host_audio = audio.float().cpu() if speech else None
        if speech:
            latents, semantic = latents.float().cpu(), semantic.float().cpu()
        phases = {
            "prefill+decode": (t1 - t0) * 1000,
            "render": (t2 - t1) * 1000,
            "accept": (t3 - t2) * 1000,
            "to host": (time.perf_counter() - t3) * 1000,
        }
        return StepOutput(ready, decisions, host_audio, phases, latents, semantic)

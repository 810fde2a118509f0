"""The llm's step loop: streams join and leave at step boundaries; one acoustic message per batched step."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from services.acoustic.engine import StreamSpec
from services.llm.acoustic_link import AcousticLink, AcousticUnavailable
from services.llm.engine import Decision, LMEngine, LMStream

log = logging.getLogger(__name__)


@dataclass
class Frame:
    index: int
    segment: int
    audio: torch.Tensor


@dataclass
class PromptDone:
    tokens: int


@dataclass
class Finished:
    frames: int
    reason: str


@dataclass
class Failed:
    message: str


Event = Frame | PromptDone | Finished | Failed


@dataclass
class Job:
    stream: LMStream
    spec: StreamSpec
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False


class Scheduler:
    def __init__(self, engine: LMEngine, link: AcousticLink, max_streams: int) -> None:
        self.engine = engine
        self.link = link
        self.max_streams = max_streams
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []
        self.wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._step = 0
        self._task: asyncio.Task | None = None

    def new_stream_id(self) -> int:
        return next(self._ids)

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self.wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="llm-step-loop")

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        if job in self.pending:
            self.pending.remove(job)
        self.wake.set()

    @property
    def load(self) -> int:
        return len(self.active) + len(self.pending)

    async def _run(self) -> None:
        while True:
            if not self.active and not self.pending:
                self.wake.clear()
                await self.wake.wait()
            try:
                await self._one_step()
            except AcousticUnavailable as e:
                log.error("%s; failing %d streams", e, len(self.active))
                self._fail_all(str(e))
            except Exception as e:  # a bug or a device error must not leave streams hanging
                log.exception("step failed")
                self._fail_all(f"llm step failed: {type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        for job in self.active:
            job.events.put_nowait(Failed(message))
        self.active = []

    async def _one_step(self) -> None:
        ends = [j.spec.stream_id for j in self.active if j.cancelled]
        self.active = [j for j in self.active if not j.cancelled]
        joined = []
        while self.pending and len(self.active) < self.max_streams:
            job = self.pending.popleft()
            self.active.append(job)
            joined.append(job)
        if not self.active:
            if ends:
                await self.link.step(self._step, [], [], None, None, ends)
            return

        jobs = list(self.active)
        decisions: list[Decision] = await asyncio.to_thread(self.engine.step, [j.stream for j in jobs])
        for job in joined:
            job.events.put_nowait(PromptDone(len(job.stream.prompt_ids)))

        speech = [(j, d) for j, d in zip(jobs, decisions, strict=True) if d.positive is not None]
        done = [(j, d) for j, d in zip(jobs, decisions, strict=True) if d.token == self.engine.eos_token_id]
        ends += [j.spec.stream_id for j, _ in done]
        positive = torch.stack([d.positive for _, d in speech]) if speech else None
        negative = torch.stack([d.negative for _, d in speech]) if speech else None
        embeds, audio = await self.link.step(
            self._step, [j.spec for j in joined], [j.spec.stream_id for j, _ in speech], positive, negative, ends
        )
        self._step += 1

        rows = {id(j): i for i, (j, _) in enumerate(speech)}
        for job, decision in zip(jobs, decisions, strict=True):
            if decision.token == self.engine.eos_token_id:
                continue
            row = rows.get(id(job))
            self.engine.accept(decision, embeds[row] if row is not None else None)
            if row is not None:
                s = job.stream
                job.events.put_nowait(Frame(s.frames - 1, s.segment, audio[row]))
        for job, _ in done:
            s = job.stream
            reason = "fixed_frames" if s.fixed_frames else ("max_frames" if s.frames >= s.max_frames else "eos")
            job.events.put_nowait(Finished(s.frames, reason))
        finished = {id(j) for j, _ in done}
        self.active = [j for j in self.active if id(j) not in finished]

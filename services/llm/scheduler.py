"""The llm's step loop: streams join and leave at step boundaries; one acoustic message per batched step.

Every step is schedule -> execute -> update. The scheduler releases streams that were cancelled, admits
waiting ones while the engine has room (a batch row and the KV pages they are expected to need), and sets
the prefill budget (so a long new script never freezes the streams already playing); that plan goes to the
runner (`services/llm/runner.py`), which prefills, decodes, renders and accepts; the scheduler then hands
each stream its events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from services.common.step_stats import StepStats
from services.llm.engine import LMEngine, LMStream
from services.llm.runner import StepPlan, StepRunner
from services.render.link import RenderLink, RenderUnavailable
from services.render.values import StreamSpec

log = logging.getLogger(__name__)


@dataclass
class Frame:
    index: int
    segment: int
    audio: torch.Tensor
    # What a resume rebuilds the stream from (GeneratedFrame's fields of the same names).
    tokens_before: list[int] = field(default_factory=list)
    latent: torch.Tensor | None = None
    semantic: torch.Tensor | None = None


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


@dataclass
class StillWorking:
    """The stream is deciding but has made no audio for a while (tokens that are not speech)."""

    positions: int


Event = Frame | PromptDone | Finished | Failed | StillWorking

# A stream that makes no frame for this long says it is alive, so no proxy on the way (Envoy ends streams idle
# for 60 s) takes a model that chooses many tokens that are not speech for a dead stream.
KEEPALIVE_S = 5.0


@dataclass(eq=False)  # compared by identity: two identical requests are two jobs
class Job:
    stream: LMStream
    spec: StreamSpec
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    last_event: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, engine: LMEngine, link: RenderLink, prefill_budget: int | None = None) -> None:
        self.engine = engine
        self.runner = StepRunner(engine, link)
        self.prefill_budget = prefill_budget
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # holding an engine slot
        self.wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self.step_ms = 0.0  # moving average of a decoding step's wall time
        self.phase_ms: dict[str, float] = {}
        self.stats = StepStats(log, "llm step")
        self._rows = 0  # streams in the last step

    def new_stream_id(self) -> int:
        return next(self._ids)

    def submit(self, job: Job) -> None:
        self.waiting.append(job)
        self.wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="llm-step-loop")

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        for i, waiting in enumerate(self.waiting):
            if waiting is job:
                del self.waiting[i]
                break
        self.wake.set()

    async def _run(self) -> None:
        while True:
            if not self.active and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            try:
                await self._one_step()
            except RenderUnavailable as e:
                log.error("%s; failing %d streams", e, len(self.active))
                self._fail_all(str(e))
            except Exception as e:  # a bug or a device error must not leave streams hanging
                log.exception("step failed")
                self._fail_all(f"llm step failed: {type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        """End every active stream: its llm slot now, its acoustic rows with the next step's message."""
        for job in self.active:
            job.events.put_nowait(Failed(message))
            self.engine.release(job.stream)
            self.runner.orphans.add(job.spec.stream_id)
        self.active = []

    def _retire(self, jobs: list[Job]) -> list[int]:
        for job in jobs:
            self.engine.release(job.stream)
        gone = {id(j) for j in jobs}
        self.active = [j for j in self.active if id(j) not in gone]
        return [j.spec.stream_id for j in jobs]

    async def _one_step(self) -> None:
        started = time.perf_counter()
        await self._step_once()
        if self.active:
            elapsed_ms = (time.perf_counter() - started) * 1000
            self.step_ms = 0.9 * self.step_ms + 0.1 * elapsed_ms
            if self.phase_ms:
                self.stats.add(self._rows, self.phase_ms, elapsed_ms, f" ({len(self.waiting)} waiting)")

    def _plan(self) -> StepPlan:
        ended = self._retire([j for j in self.active if j.cancelled])
        joined = []
        while self.waiting and self.engine.admit(self.waiting[0].stream):
            job = self.waiting.popleft()
            self.active.append(job)
            joined.append(job.spec)
        return StepPlan(joined, ended, self.prefill_budget)

    async def _step_once(self) -> None:
        plan = self._plan()
        by_stream = {id(j.stream): j for j in self.active}
        out = await self.runner.step(plan, {k: j.spec.stream_id for k, j in by_stream.items()})
        t0 = time.perf_counter()
        for stream in out.ready:
            by_stream[id(stream)].events.put_nowait(PromptDone(len(stream.prompt_ids)))
        speech = [d for d in out.decisions if d.speech]
        for row, d in enumerate(speech):
            s = d.stream
            frame = Frame(
                s.frames - 1, s.segment, out.audio[row], s.tokens_before_frame, out.latents[row], out.semantic[row]
            )
            by_stream[id(s)].events.put_nowait(frame)
        now = time.monotonic()
        for d in out.decisions:
            job = by_stream[id(d.stream)]
            if d.speech:
                job.last_event = now
            elif d.finish is None and now - job.last_event > KEEPALIVE_S:
                job.events.put_nowait(StillWorking(d.stream.positive_len))
                job.last_event = now
        done = [by_stream[id(d.stream)] for d in out.decisions if d.finish is not None]
        for d in out.decisions:
            if d.finish is not None:
                by_stream[id(d.stream)].events.put_nowait(Finished(d.stream.frames, d.finish))
        self._retire(done)
        # where a step's time went, for the step log
        self._rows = len(out.decisions)
        self.phase_ms = {**out.phase_ms, "deliver": (time.perf_counter() - t0) * 1000}

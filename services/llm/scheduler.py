"""The llm's step loop: streams join and leave at step boundaries; one acoustic message per batched step.

Every step: release streams that were cancelled, give waiting streams free slots, prefill up to a token
budget of new prompts (so a long new script never freezes the streams already playing), run one batched
decode step for every ready stream, send the speaking streams' conditions to the acoustic side in one
message, and hand each stream its frame.
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
from services.llm.engine import IDLE_PREFILL_CHUNKS, LMEngine, LMStream
from services.render.link import RenderLink, RenderUnavailable
from services.render.values import RenderStep, StreamSpec

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
    def __init__(self, engine: LMEngine, link: RenderLink, prefill_budget: int = 512) -> None:
        self.engine = engine
        self.link = link
        self.prefill_budget = prefill_budget
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # holding an engine slot
        self.wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._step = 0
        self._task: asyncio.Task | None = None
        self.step_ms = 0.0  # moving average of a decoding step's wall time
        self.phase_ms: dict[str, float] = {}
        self.stats = StepStats(log, "llm step")
        self._rows = 0  # streams in the last step
        # Streams the acoustic side may still hold after a failed step: released with the next message.
        self._orphans: set[int] = set()

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
            self._orphans.add(job.spec.stream_id)
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

    async def _step_once(self) -> None:
        self.phase_ms = {}
        ends = self._retire([j for j in self.active if j.cancelled])
        joined = []
        while self.waiting and self.engine.admit(self.waiting[0].stream):
            job = self.waiting.popleft()
            self.active.append(job)
            joined.append(job)

        def compute():
            idle = self.engine.decoding_count == 0  # nobody plays: the prefill may take the whole step
            ready = self.engine.prefill(self.prefill_budget * (IDLE_PREFILL_CHUNKS if idle else 1))
            return ready, *self.engine.decode()

        t0 = time.perf_counter()
        ready, decisions, positive, negative = await asyncio.to_thread(compute)
        t1 = time.perf_counter()
        by_stream = {id(j.stream): j for j in self.active}
        for stream in ready:
            by_stream[id(stream)].events.put_nowait(PromptDone(len(stream.prompt_ids)))

        speech = [d for d in decisions if d.speech]
        if speech and len(speech) != len(decisions):
            rows = torch.tensor([d.row for d in speech], device=positive.device)
            positive, negative = positive.index_select(0, rows), negative.index_select(0, rows)
        done = [by_stream[id(d.stream)] for d in decisions if d.finish is not None]
        ids = [by_stream[id(d.stream)].spec.stream_id for d in speech]
        t2 = time.perf_counter()
        ends = ends + [j.spec.stream_id for j in done]
        embeds = audio = None
        if joined or ids or ends or self._orphans:
            # Only a step that changes the acoustic side talks to it; a step in which every stream chose
            # audio_bos or audio_eos is the llm's alone.
            orphans, self._orphans = sorted(self._orphans), set()
            try:
                result = await self.link.step(
                    RenderStep(
                        self._step,
                        [j.spec for j in joined],
                        ids,
                        positive if ids else None,
                        negative if ids else None,
                        orphans + ends,
                    )
                )
                embeds, audio = result.embeddings, result.audio
            except BaseException:
                # Whatever this message carried may or may not have reached the acoustic side.
                self._orphans.update(orphans + ends + [j.spec.stream_id for j in joined])
                raise
            self._step += 1
        t3 = time.perf_counter()
        if decisions:
            await asyncio.to_thread(self.engine.accept, decisions, embeds)
        t4 = time.perf_counter()
        if speech:
            audio = audio.float().cpu()
            for row, d in enumerate(speech):
                s = d.stream
                by_stream[id(s)].events.put_nowait(Frame(s.frames - 1, s.segment, audio[row]))
        now = time.monotonic()
        for d in decisions:
            job = by_stream[id(d.stream)]
            if d.speech:
                job.last_event = now
            elif d.finish is None and now - job.last_event > KEEPALIVE_S:
                job.events.put_nowait(StillWorking(d.stream.positive_len))
                job.last_event = now
        finish = {id(d.stream): d.finish for d in decisions if d.finish is not None}
        for job in done:
            job.events.put_nowait(Finished(job.stream.frames, finish[id(job.stream)]))
        self._retire(done)
        # where a step's time went, for the step log
        self._rows = len(decisions)
        self.phase_ms = {
            "prefill+decode": (t1 - t0) * 1000,
            "render": (t3 - t2) * 1000,
            "accept": (t4 - t3) * 1000,
            "deliver": (time.perf_counter() - t4) * 1000,
        }

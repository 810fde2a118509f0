"""The llm's step loop: streams join and leave at step boundaries; one acoustic message per batched step.

Every step is schedule -> execute -> update. The scheduler releases streams that were cancelled, admits
waiting ones while the engine has room (a batch row and the KV pages they are expected to need), and sets
the prefill budget (so a long new script never freezes the streams already playing); that plan goes to the
runner (`services/llm/runner.py`), which prefills, decodes, renders and accepts; the scheduler then hands
each stream its events.

Over a link that can hold a step in flight (a remote acoustic service, tensors in the messages) the scheduler
pipelines: it splits the decoding slots into two halves and plans one half at a time, so one half's render
overlaps the other half's language-model step (`services/llm/runner.py`). Anything that moves a decoding
stream to another slot (a stream that ends or is cancelled, one that becomes ready to decode, a swap to host
memory) waits until no half is in flight: the scheduler first plans a step that only collects the half in
flight, then a plain step or a new split. A stream that becomes ready takes the slot after the last decoding one,
which moves nobody: the second half takes it in.

A stream whose consumer has fallen far behind sits out the steps, keeping its pages (`LMEngine.hold`), until
the consumer catches up: its audio waits nowhere in bulk. Behind means its StreamAudio subscriber is (the acoustic
side reports it, `render.audio_out`), or its own events wait unread here (those carry the audio when the stream
has no audio key). A stream held for `HELD_LIMIT_S` (its consumer stopped reading) ends, freeing its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from services.common.frames import FRAME_MS
from services.common.step_stats import StepStats
from services.llm.engine import LMEngine, LMStream
from services.llm.runner import StepPlan, StepRunner
from services.llm.step_profile import StepProfile
from services.render.audio_out import LEAD_FRAMES, RESUME_FRAMES
from services.render.link import RenderLink, RenderUnavailable
from services.render.values import StreamSpec

log = logging.getLogger(__name__)


@dataclass
class Frame:
    index: int
    segment: int
    audio: torch.Tensor | None  # None: it went from the acoustic side straight to the consumer (a keyed stream)
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
HELD_LIMIT_S = 300.0  # a stream whose consumer read nothing for this long is ended


@dataclass(eq=False)  # compared by identity: two identical requests are two jobs
class Job:
    stream: LMStream
    spec: StreamSpec
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    last_event: float = field(default_factory=time.monotonic)
    held_since: float | None = None  # while its consumer is behind (`LMEngine.hold`)


class Scheduler:
    def __init__(
        self,
        engine: LMEngine,
        link: RenderLink,
        prefill_budget: int | None = None,
        pipelined: bool = False,
        profile: StepProfile | None = None,
        lead: tuple[int, int] = (LEAD_FRAMES, RESUME_FRAMES),
    ) -> None:
        self.engine = engine
        self.profile = profile or StepProfile(None)
        self.runner = StepRunner(engine, link)
        self.prefill_budget = prefill_budget
        self.pipelined = pipelined  # split steps in two halves whenever the link can hold one in flight
        self._halves: tuple[range, range] | None = None  # the decoding slots' split while a half is in flight
        self._next_half = 0
        self._finishing: list[Job] = []  # ended in a half while the other was in flight: retired once it lands
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # holding an engine slot
        self.wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self.step_ms = 0.0  # moving average of a decoding step's wall time
        self.phase_ms: dict[str, float] = {}
        self.stats = StepStats(log, "llm step")
        self._rows = 0  # streams in the last step
        # Frames a consumer may leave unread before its stream is held, and as few as it resumes at.
        self.lead, self.resume = lead
        self.behind: set[int] = set()  # acoustic stream ids whose consumer the acoustic side last said is behind
        self.held_limit_s = HELD_LIMIT_S

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
            elif self._only_held():
                # Nothing to do until a consumer catches up: look again a frame later, or when a call comes.
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), FRAME_MS / 1000)
            try:
                await self._one_step()
            except RenderUnavailable as e:
                log.error("%s; failing %d streams", e, len(self.active))
                await self._fail_all(str(e))
            except Exception as e:  # a bug or a device error must not leave streams hanging
                log.exception("step failed")
                await self._fail_all(f"llm step failed: {type(e).__name__}: {e}")

    async def _fail_all(self, message: str) -> None:
        """End every active stream: its llm slot now, its acoustic rows with the next step's message."""
        await self.runner.abandon()
        for job in self.active:
            job.events.put_nowait(Failed(message))
            self.engine.release(job.stream)
            self.runner.orphans.add(job.spec.stream_id)
        self.active = []
        self._finishing = []
        self._halves = None

    def _retire(self, jobs: list[Job]) -> list[int]:
        for job in jobs:
            self.engine.release(job.stream)
        gone = {id(j) for j in jobs}
        self.active = [j for j in self.active if id(j) not in gone]
        return [j.spec.stream_id for j in jobs]

    async def _one_step(self) -> None:
        started = time.perf_counter()
        # Only while the profile waits: otherwise a step does not look at every stream for it.
        prompt = 0
        if self.profile.waiting:
            prompt = max((len(s.prompt_ids) for s in self.engine.streams if s.plan is not None), default=0)
        with self.profile.around(prompt, self.engine.decoding_count if prompt else 0):
            plan = await self._step_once()
        if self.active:
            elapsed_ms = (time.perf_counter() - started) * 1000
            if not plan.pipelined:
                self.step_ms = 0.9 * self.step_ms + 0.1 * elapsed_ms
            elif plan.rows:  # half of the streams: a frame of every stream takes two of these
                self.step_ms = 0.9 * self.step_ms + 0.1 * 2 * elapsed_ms
            if self.phase_ms:
                self.stats.add(self._rows, self.phase_ms, elapsed_ms, f" ({len(self.waiting)} waiting)")

    def _admit(self) -> list[StreamSpec]:
        joined = []
        while self.waiting and self.engine.admit(self.waiting[0].stream):
            job = self.waiting.popleft()
            self.active.append(job)
            joined.append(job.spec)
        return joined

    def _only_held(self) -> bool:
        """Every stream with a slot is held: no step would decode or prefill anything."""
        streams = self.engine.streams
        return bool(streams) and all(s.held for s in streams)

    def _is_behind(self, job: Job) -> bool:
        unread = job.events.qsize()
        return job.spec.stream_id in self.behind or unread > (self.resume if job.stream.held else self.lead)

    def _pacing(self) -> tuple[list[Job], list[Job], list[Job]]:
        """(decoding streams to hold, held streams to let decode again, held streams to end: held too long)."""
        now = time.monotonic()
        live = [j for j in self.active if not j.cancelled]
        hold = [j for j in live if j.stream.decoding and self._is_behind(j)]
        resume = [j for j in live if j.stream.held and not self._is_behind(j)]
        expired = [j for j in live if j.held_since is not None and now - j.held_since > self.held_limit_s]
        return hold, resume, [j for j in expired if j not in resume]

    def _pace(self) -> None:
        """Hold the streams whose consumers fell behind, let those that caught up decode, and end those held for
        too long. Moves slots: only while no half is in flight."""
        hold, resume, expired = self._pacing()
        for job in hold:
            self.engine.hold(job.stream)
            job.held_since = time.monotonic()
            log.debug("stream %d held: its consumer is %d+ frames behind", job.spec.stream_id, self.lead)
        for job in resume:
            self.engine.unhold(job.stream)
            job.held_since = None
        for job in expired:
            message = f"the stream's consumer read nothing for {self.held_limit_s:.0f} s"
            log.warning("stream %d ended: %s", job.spec.stream_id, message)
            job.events.put_nowait(Failed(message))
            job.cancelled = True

    def _plan(self) -> StepPlan:
        cancelled = [j for j in self.active if j.cancelled and j not in self._finishing]
        if self.runner.in_flight is not None:
            joined = self._admit()  # first: its reservations leave fewer free pages for the check below
            first, second = self._halves
            if len(first) + 1 >= self.engine.decoding_count - second.start > len(second):
                # Streams that became ready (their prompts prefilled) took the slots after the last decoding one,
                # moving nobody: the second half takes them in, while the halves stay about even.
                self._halves = first, range(second.start, self.engine.decoding_count)
            if cancelled or self._finishing or any(self._pacing()) or not self._may_pipeline(self._halves[1].stop):
                # Slots are about to move: collect the half in flight first, decoding and prefilling nothing.
                self._halves = None
                return StepPlan(joined, prefill_budget=0, rows=range(0))
            half, self._next_half = self._halves[self._next_half], 1 - self._next_half
            # One prefill chunk per frame of every stream, as in a plain step: in the first half's steps only.
            budget = self.prefill_budget if self._next_half == 1 else 0
            return StepPlan(joined, [], budget, half)
        ended = self._retire(cancelled)
        self._retire(self._finishing)  # their acoustic side ended with the message of their last step
        self._finishing = []
        self._pace()
        ended += self._retire([j for j in self.active if j.cancelled])  # held too long
        joined = self._admit()
        decoding = self.engine.decoding_count
        if not self._may_pipeline(decoding):
            self._halves = None
            return StepPlan(joined, ended, self.prefill_budget, ask_behind=self._only_held())
        middle = (decoding + 1) // 2
        self._halves, self._next_half = (range(middle), range(middle, decoding)), 1
        return StepPlan(joined, ended, self.prefill_budget, self._halves[0])

    def _may_pipeline(self, decoding: int) -> bool:
        """Whether the next step may leave a half in flight: pipelining is on and the link can, at least two
        streams decode (`decoding` of them, none added since the split), and no stream can be swapped out."""
        if not (self.pipelined and self.runner.can_pipeline and decoding >= 2):
            return False
        return self.engine.decoding_count == decoding and pages_short(self.engine) <= self.engine.blocks.available

    async def _step_once(self) -> StepPlan:
        plan = self._plan()
        by_stream = {id(j.stream): j for j in self.active}
        out = await self.runner.step(plan, {k: j.spec.stream_id for k, j in by_stream.items()})
        t0 = time.perf_counter()
        if out.behind is not None:
            self.behind = set(out.behind)
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
        if self.runner.in_flight is None:
            self._retire(done)
        else:  # releasing a slot moves another stream's, perhaps one in flight
            self._finishing += done
        # where a step's time went, for the step log
        self._rows = len(out.decisions)
        self.phase_ms = {**out.phase_ms, "deliver": (time.perf_counter() - t0) * 1000}
        return plan


def pages_short(engine: LMEngine) -> int:
    """Unreserved pages the next step may take: every decoding stream's next position and every prompt's rest.
    While it fits the free pages no stream is swapped out, so a pipelined half in flight keeps its slots; a
    stream swapped out counts as short of everything (it is swapped back in by taking free pages)."""
    short = 0
    for stream in engine.streams:
        if stream.swapped is not None and not stream.held:  # a held one waits for its consumer, not for pages
            return engine.blocks.usable + 1
        if stream.decoding:
            positions = [n + 1 for n in stream.lengths]
        elif stream.plan is not None:
            # It may finish its prompt and decode in the same step: one more position in each branch.
            positions = [n + 1 for n in stream.plan.lengths]
        else:
            continue
        short += engine.blocks.short(stream.pages, positions)
    return short

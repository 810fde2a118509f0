"""Running jobs: start them on spare capacity, drive each through text_parser, acoustic and llm as the gateway
drives a Synthesize call, store every frame as it comes, and checkpoint.

Checkpoints: the frames file is fsynced, then the record's `frames_done` set to the frames it holds, every
CHECKPOINT_FRAMES frames (2 s of audio), at the end, and when a run stops for any reason. A kill -9 of the jobs
service loses at most the frames after the last checkpoint.

A job whose frames do not fit the store (its quota, or a full disk) fails with RESOURCE_EXHAUSTED and its
frames are dropped, so the space it took goes back to the jobs still running; no other job's files change.

Resume: a job that was interrupted (the jobs service restarted, or the llm or the acoustic service went away:
UNAVAILABLE) goes back to the queue and goes on from its checkpoint, in the last segment the checkpoint reached,
with its stored request and seed. Every frame's state is stored beside its audio (services/jobs/state_log.py),
and the segment's llm stream is rebuilt from it (GenerateRequest.resume): the llm prefills its branches from the
steps taken, the acoustic service replays the last frames' latents and skips their noise, and the frames after
the checkpoint come next, equal to an uninterrupted run's. A job whose stored state does not cover the segment
(stored before the state log existed) runs the segment again from its first frame: the frames the store
already holds are skipped as they come, unchecked, and the new ones are appended after the checkpoint, which
is correct because a job's audio is deterministic given its script, voices and seed (README, "Seeds"). The log
says which path a resume took, and GetJob counts `rebuilds` and `frames_regenerated`.

Live calls come first: when live Synthesize streams wait in the llm's queue (Capacity's `waiting_live`), jobs
give their llm streams up, as many as streams wait, those with the fewest frames first (the least work to
make again). A paused job checkpoints, goes back to QUEUED (its `pauses` counted) and resumes as above once
the llm has spare room again (services/jobs/spare.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

from google.rpc import code_pb2, status_pb2
from vibevoice.mesh.v1 import mesh_pb2
from vibevoice.tts.v1 import tts_pb2

from services.common.errors import RequestError
from services.common.frames import FRAMES_PER_SECOND
from services.common.logs import escape
from services.common.wire_arrays import as_numpy
from services.jobs import store as states
from services.jobs.checks import check_job_audio
from services.jobs.frame_log import FrameLog, read_frames
from services.jobs.segments import JobSegments
from services.jobs.spare import has_room
from services.jobs.state_log import FrameState
from services.jobs.store import JobRecord, Store, StoreFull
from services.synthesis.backends import Backends, Prepared, decode_voices
from services.synthesis.estimates import estimated_positions
from services.synthesis.options import Options, check_options
from services.synthesis.segments import Finished, Progress, Resume, SegmentStart, run_segments
from services.synthesis.voice_cache import Voice

log = logging.getLogger(__name__)

CHECKPOINT_AUDIO_SECONDS = 2.0
CHECKPOINT_FRAMES = int(CHECKPOINT_AUDIO_SECONDS * FRAMES_PER_SECOND)  # 15 frames of 133 ms
SCHEDULE_EVERY_S = 0.5
PREPARE_TIMEOUT_S = 60.0
MAX_RESUMES = 20  # a job interrupted more often than this fails with the last interruption's status


class Signal:
    """Wakes everyone waiting; a waiter takes `current()` before reading state, so no change is missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass
class Run:
    """A job running in this process."""

    task: asyncio.Task | None = None
    frames: int = 0  # frames in its log (durable or not)
    started: float = field(default_factory=time.monotonic)
    frames_at_start: int = 0
    streaming: bool = False  # the llm has read its prompt (it counts in the llm's Capacity from then on)
    cancelled: bool = False
    regenerated: int = 0  # frames the store held that came again (a resume that could not rebuild)

    def seconds_left(self, total: int) -> float | None:
        made = self.frames - self.frames_at_start
        if made <= 0:
            return None
        return max(0, total - self.frames) * (time.monotonic() - self.started) / made


def failure(code: int, message: str) -> bytes:
    return status_pb2.Status(code=code, message=message).SerializeToString()


async def _sync(frame_log: FrameLog) -> int:
    """fsync in a thread; if the caller is cancelled meanwhile, the fsync still ends before the fd may close."""
    done = asyncio.get_running_loop().run_in_executor(None, frame_log.sync)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait([done])
        raise


class Runner:
    def __init__(self, store: Store, backends: Backends, max_running: int, reserve: float) -> None:
        self.store = store
        self.segments = JobSegments(store.db)
        self.backends = backends
        self.max_running = max_running
        self.reserve = reserve
        self.runs: dict[str, Run] = {}
        self.signals: dict[str, Signal] = {}
        self.wake = asyncio.Event()
        self._paused_at = 0.0

    def signal(self, job_id: str) -> Signal:
        return self.signals.setdefault(job_id, Signal())

    def changed(self, job_id: str) -> None:
        if job_id in self.signals:
            self.signals[job_id].notify()

    def frames(self, record: JobRecord) -> int:
        """Frames of the job a reader can have now: its log's while it runs here, else the checkpoint's."""
        run = self.runs.get(record.job_id)
        return run.frames if run is not None else record.frames_done

    # ---- starting

    def recover(self) -> None:
        """At start-up: jobs that were running when the service stopped go back to the queue, to resume."""
        for record in self.store.in_state(states.RUNNING):
            self.store.transition(record.job_id, states.QUEUED, resumes=record.resumes + 1)
            log.info("job %s: resumes from frame %d", record.job_id, record.frames_done)
        for job_id in self.store.remove_orphans():
            log.info("removed %s: files without a job record", escape(job_id))

    async def schedule(self) -> None:
        """Pauses jobs while live calls wait for room, else starts queued jobs, oldest first, one at a time, while
        the llm has spare room."""
        while True:
            try:
                await self._tick()
            except RequestError as e:  # the llm is away or draining: try again later
                log.debug("no job started: %s", e.status.message)
            except Exception:
                log.exception("scheduling jobs failed")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), SCHEDULE_EVERY_S)

    async def _tick(self) -> None:
        queued = self.store.in_state(states.QUEUED) if len(self.runs) < self.max_running else []
        if not self.runs and not queued:
            return
        capacity = await self.backends.capacity()
        if capacity.waiting_live:
            await self._pause_for_live(capacity)
        elif queued:
            await self._start_next(queued[0], capacity)

    async def _start_next(self, record: JobRecord, capacity: mesh_pb2.CapacityResponse) -> None:
        request = tts_pb2.SynthesizeRequest.FromString(self.store.read_request(record.job_id))
        starting = sum(1 for r in self.runs.values() if not r.streaming)
        if not has_room(capacity, estimated_positions(request, capacity.max_positions), self.reserve, starting):
            return
        record = self.store.get(record.job_id)
        if record is None or record.state != states.QUEUED:  # cancelled or deleted meanwhile
            return
        self.store.transition(record.job_id, states.RUNNING)
        run = Run(frames=record.frames_done, frames_at_start=record.frames_done)
        self.runs[record.job_id] = run
        run.task = asyncio.create_task(self._run(record, request, run))
        self.changed(record.job_id)

    # ---- running

    async def _run(self, record: JobRecord, request: tts_pb2.SynthesizeRequest, run: Run) -> None:
        job_id = record.job_id
        frame_log: FrameLog | None = None
        try:
            header = tts_pb2.StreamHeader.FromString(record.header)
            options = replace(check_options(request), seed=record.seed)
            voices = await asyncio.to_thread(decode_voices, request)
            prepared = await self.backends.prepare(request, options, header.request_id, voices, PREPARE_TIMEOUT_S)
            prepared.generate.background = True  # live calls come first (_pause_for_live)
            frame_log = FrameLog(self.store, job_id, record.frames_done)
            start = None
            if self.segments.matches(job_id, prepared.segments):
                start = self.segments.resume_at(job_id, frame_log.frames)
            else:  # planned anew (the llm's context changed): from the first segment
                self.segments.plan(job_id, prepared.segments)
            log.info("job %s: running from frame %d", job_id, frame_log.frames)
            # Reads the segment's stored frame states (812 bytes a frame): off the loop that serves every job.
            resume = await asyncio.to_thread(self._resume, job_id, frame_log, start)
            while True:
                try:
                    await self._follow(job_id, run, frame_log, prepared, options, voices, start, resume)
                    return
                except RequestError as e:
                    # An llm that cannot rebuild this history (another model, a smaller context) makes the
                    # segment again instead.
                    if resume is None or e.status.code != code_pb2.INVALID_ARGUMENT or run.frames > frame_log.synced:
                        raise
                    log.warning("job %s: the llm refused the rebuild (%s); the segment is made again", job_id, e)
                    resume = None
        except StoreFull as e:
            # Its frames go too: a failed job has no file to give, and the space lets the other jobs go on.
            log.warning("job %s: failed: %s; its %d frames are dropped", job_id, e, run.frames)
            if frame_log is not None:
                frame_log.discard()
            self.store.checkpoint(job_id, 0)
            self._end(job_id, None, states.FAILED, error=failure(code_pb2.RESOURCE_EXHAUSTED, str(e)))
        except RequestError as e:
            self._interrupted(job_id, frame_log, e.status)
        except asyncio.CancelledError:
            # CancelJob, DeleteJob or the service stopping: keep what was made.
            self._last_checkpoint(job_id, frame_log)
            if run.cancelled:
                self._end(job_id, None, states.CANCELLED)
            raise
        except Exception as e:
            log.exception("job %s failed", job_id)
            self._end(job_id, frame_log, states.FAILED, error=failure(code_pb2.ABORTED, f"the job stopped: {e}"))
        finally:
            if frame_log is not None:
                frame_log.close()
            if run.regenerated:
                self.store.count_resume(job_id, rebuilt=False, frames_regenerated=run.regenerated)
            self.runs.pop(job_id, None)
            self.changed(job_id)
            self.wake.set()

    def _resume(self, job_id: str, frame_log: FrameLog, start: SegmentStart | None) -> Resume | None:
        """How the run goes on from the checkpoint: its segment's stream rebuilt from the stored frame states, or
        (None) made again from the segment's first frame."""
        if start is None or frame_log.frames <= start.first_frame:
            return None
        history, why_not = frame_log.states.history(start.first_frame, frame_log.frames)
        if history is None:
            log.info(
                "job %s: resumes by making segment %d again from frame %d (%s)",
                job_id,
                start.index,
                start.first_frame,
                why_not,
            )
            return None
        ((_, last_speech, _),) = read_frames(self.store.frames_path(job_id), frame_log.frames - 1, frame_log.frames)
        log.info(
            "job %s: resumes by rebuilding segment %d's stream from its %d stored frames",
            job_id,
            start.index,
            frame_log.frames - start.first_frame,
        )
        return Resume(history, last_speech - start.first_speech)

    async def _follow(
        self,
        job_id: str,
        run: Run,
        frame_log: FrameLog,
        prepared: Prepared,
        options: Options,
        voices: list[Voice],
        start: SegmentStart | None,
        resume: Resume | None,
    ) -> None:
        """Stores the script's frames as they come, checkpointing, until it has succeeded."""
        async for event in run_segments(self.backends, prepared, options, voices, lambda: None, start, resume):
            if isinstance(event, SegmentStart):
                self.segments.started(job_id, event)
                log.info("job %s: segment %d starts at frame %d", job_id, event.index, event.first_frame)
            elif isinstance(event, Progress):
                if resume is not None and not run.streaming:  # the llm took the history: a rebuild
                    self.store.count_resume(job_id, rebuilt=True)
                run.streaming = True
            elif isinstance(event, mesh_pb2.GeneratedFrame) and event.index < frame_log.frames:
                run.regenerated += 1  # stored already
            elif isinstance(event, mesh_pb2.GeneratedFrame):
                samples = as_numpy(event.audio)  # no torch call on the loop that relays every job's frames
                frame_log.append(event.index, event.segment_index, samples, FrameState.of(event))
                run.frames = frame_log.frames
                if frame_log.frames - frame_log.synced >= CHECKPOINT_FRAMES:
                    self.store.checkpoint(job_id, await _sync(frame_log))
                self.changed(job_id)
            elif isinstance(event, Finished):
                self.store.checkpoint(job_id, await _sync(frame_log))
                await self._check(job_id, frame_log.frames)
                self.store.transition(
                    job_id, states.SUCCEEDED, finish_reason=event.finish_reason, estimated_frames=frame_log.frames
                )
                log.info("job %s: succeeded, %d frames (%s)", job_id, frame_log.frames, event.finish_reason)
                return
        raise RequestError(status_pb2.Status(code=code_pb2.UNAVAILABLE, message="the llm's stream ended early"))

    async def _check(self, job_id: str, frames: int) -> None:
        starts = [s.first_frame for s in self.segments.listed(job_id, frames)]
        checks = await asyncio.to_thread(check_job_audio, self.store.frames_path(job_id), frames, starts)
        self.store.set_checks(job_id, checks.SerializeToString())
        if checks.gap_over_one_second:
            log.warning(
                "job %s: a gap of %.2f s inside a segment, at %.2f s",
                job_id,
                checks.longest_gap_seconds,
                checks.gap_at_seconds,
            )

    def _last_checkpoint(self, job_id: str, frame_log: FrameLog | None) -> None:
        if frame_log is None:
            return
        try:
            self.store.checkpoint(job_id, frame_log.sync())
        except (OSError, StoreFull) as e:  # the record keeps the previous checkpoint
            log.warning("job %s: last checkpoint failed: %s", job_id, e)

    def _end(self, job_id: str, frame_log: FrameLog | None, state: str, **values) -> None:
        self._last_checkpoint(job_id, frame_log)
        self.store.transition(job_id, state, **values)

    def _interrupted(self, job_id: str, frame_log: FrameLog | None, status: status_pb2.Status) -> None:
        """A hop that went away (UNAVAILABLE) sends the job back to the queue; any other status ends it."""
        record = self.store.get(job_id)
        if status.code == code_pb2.UNAVAILABLE and record.resumes < MAX_RESUMES:
            log.info("job %s: interrupted (%s); queued to resume", job_id, status.message)
            self._end(job_id, frame_log, states.QUEUED, resumes=record.resumes + 1)
        else:
            log.info("job %s: failed: %s", job_id, status.message)
            self._end(job_id, frame_log, states.FAILED, error=status.SerializeToString())

    # ---- pausing

    async def _pause_for_live(self, capacity: mesh_pb2.CapacityResponse) -> None:
        """Frees the llm rows and pages of as many jobs as live streams wait. Jobs whose stream the llm has not
        taken yet go first: they hold nothing, but would take the next free row before the live streams."""
        # The rows given up last time are free from the llm's next step on: wait that long before giving more.
        if time.monotonic() - self._paused_at < max(SCHEDULE_EVERY_S, 2 * capacity.step_ms / 1000):
            return
        runs = sorted(self.runs.items(), key=lambda item: (item[1].streaming, item[1].frames))
        pending = sum(1 for _, run in runs if not run.streaming)
        chosen = [job_id for job_id, _ in runs[: pending + capacity.waiting_live]]
        if chosen:
            self._paused_at = time.monotonic()
            log.info("%d live streams wait for room: pausing jobs %s", capacity.waiting_live, ", ".join(chosen))
        for job_id in chosen:
            await self.pause(job_id)

    async def pause(self, job_id: str) -> None:
        """Ends the job's run here (its llm stream ends, its frames are checkpointed) and queues it to resume."""
        run = self.runs.get(job_id)
        if run is None or run.task is None:
            return
        run.task.cancel()
        await asyncio.wait([run.task])
        self.runs.pop(job_id, None)  # a task cancelled before it ran never reached its own clean-up
        record = self.store.get(job_id)
        if record is not None and record.state == states.RUNNING:  # not cancelled or deleted meanwhile
            self.store.transition(job_id, states.QUEUED, pauses=record.pauses + 1)
            log.info("job %s: paused for live calls at frame %d", job_id, record.frames_done)
        self.changed(job_id)

    # ---- stopping

    async def cancel(self, job_id: str) -> None:
        """Stops the job's run, if it has one here (its llm stream ends), and marks it CANCELLED."""
        run = self.runs.get(job_id)
        if run is not None and run.task is not None:
            run.cancelled = True
            run.task.cancel()
            await asyncio.wait([run.task])
            self.runs.pop(job_id, None)  # a task cancelled before it ran never reached its own clean-up
        record = self.store.get(job_id)
        if record is not None and record.state in states.ACTIVE:
            self.store.transition(job_id, states.CANCELLED)
        self.changed(job_id)

    async def stop(self) -> None:
        """The service is stopping: runs checkpoint and stay RUNNING, to resume at the next start."""
        tasks = [r.task for r in self.runs.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.runs.clear()

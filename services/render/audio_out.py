"""Per-key mailboxes of rendered frames, so audio leaves the acoustic side for its consumer, not through the llm.

A stream started with an `audio_key` has its frames put, in render order, in that key's mailbox; the
consumer's Acoustic.StreamAudio call reads them. Either may come first: a subscriber waits for the stream to
start (as long as the llm keeps it queued: only the call's own deadline or cancellation ends that wait), and a
started stream's frames wait for their subscriber. Nothing is left behind: a mailbox goes when its subscriber
leaves, or after `ttl_s` when nobody subscribes; an unread mailbox holds at most `cap` frames.

A subscriber that reads more slowly than the stream is made (a client playing in real time, or one that stops
reading) would make its mailbox hold the rest of the script. So a stream whose subscribed mailbox holds more
than `LEAD_FRAMES` is reported `behind` to the llm, which holds it out of its steps until the mailbox is down to
`RESUME_FRAMES`: the subscriber always has a minute of audio ready, and memory stays bounded.

A rendered step's frames are `gather`ed on the device (a copy queued behind the render) and copied to the host
with `Gathered.to_host` after the step has answered, so the llm's next step need not wait for a copy it does
not read; `deliver` then puts them in their mailboxes, in the order the steps were rendered.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from google.rpc import code_pb2

from services.common.errors import RequestError, invalid_argument, status_error
from services.common.tensors import device_tensor
from services.render.values import RenderResult, RenderStep

KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
TTL_S = 30.0
UNREAD_CAP = 4096  # frames (about 9 minutes of audio) an unsubscribed mailbox holds
LEAD_FRAMES = 450  # a subscriber this many frames (60 s of audio) behind has its stream held by the llm...
RESUME_FRAMES = 225  # ...until it is no more than this many (30 s) behind


@dataclass(frozen=True)
class AudioFrame:
    """One frame of a keyed stream, on the host in float32: numpy rows, so that serving them on the event loop
    makes no torch call (each would let the step's thread take the GIL, and the loop wait to get it back)."""

    index: int
    audio: np.ndarray
    latent: np.ndarray
    semantic: np.ndarray


@dataclass
class _Mailbox:
    created: float
    frames: deque[AudioFrame] = field(default_factory=deque)
    started: bool = False
    ended: bool = False
    error: RequestError | None = None  # the stream failed or its frames were dropped
    subscribed: bool = False
    behind: bool = False  # the subscriber is far behind: the llm holds the stream (see the module's text)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, frame: AudioFrame, cap: int) -> None:
        if self.error is not None or self.ended:
            return
        self.frames.append(frame)
        if not self.subscribed and len(self.frames) > cap:
            self.frames.clear()
            self.error = status_error(code_pb2.RESOURCE_EXHAUSTED, f"more than {cap} frames unread; dropped")
        self.wake.set()

    def close(self, error: RequestError | None = None) -> None:
        self.ended = True
        self.error = self.error or error
        self.wake.set()


def checked_key(key: str, field: str = "audio_key") -> str:
    if not KEY.fullmatch(key):
        raise invalid_argument(field, f"{key[:80]!r}; 1 to 64 letters, digits, '-' or '_'")
    return key


@dataclass(frozen=True)
class Routed:
    """A step's keyed frames on the host, delivered on the event loop."""

    starts: list[tuple[int, str, int]]  # engine stream id, audio key, index of its first frame
    frames: list[tuple[int, AudioFrame]]  # their indices are set at delivery
    ends: list[int]


@dataclass(frozen=True)
class Gathered:
    """A rendered step's keyed frames, still on the device: `gather` queues their copy without waiting for the
    GPU, and `to_host` (any thread) waits for it, so that the step's answer need not wait for the render."""

    starts: list[tuple[int, str, int]]
    streams: list[int]  # the keyed stream of each row of `rows`
    rows: torch.Tensor | None  # (len(streams), audio + latent + semantic): one copy to the host
    widths: tuple[int, int]  # where the latent and the semantic features start in a row
    ends: list[int]

    def to_host(self) -> Routed:
        frames = []
        if self.streams:
            host = self.rows.float().cpu().numpy()
            a, b = self.widths
            # Each frame owns its arrays: a view would keep the whole step's rows alive while any one waits unread.
            frames = [
                (s, AudioFrame(-1, row[:a].copy(), row[a:b].copy(), row[b:].copy()))
                for s, row in zip(self.streams, host, strict=True)
            ]
        return Routed(self.starts, frames, self.ends)

    def all_frames(self, step: RenderStep) -> bool:
        """Whether every frame of a step with streams goes to a mailbox: the llm then needs only its embeddings."""
        return bool(step.ids) and len(self.streams) == len(step.ids)


class AudioRouter:
    """Keyed streams' frames by key. Its methods run on the event loop, except `take` (any thread)."""

    def __init__(
        self, ttl_s: float = TTL_S, cap: int = UNREAD_CAP, lead: tuple[int, int] = (LEAD_FRAMES, RESUME_FRAMES)
    ) -> None:
        self.ttl_s, self.cap = ttl_s, cap
        self.lead, self.resume = lead
        self.boxes: dict[str, _Mailbox] = {}
        self.keys: dict[int, str] = {}  # engine stream id -> its audio key, while it runs
        self.counts: dict[int, int] = {}  # engine stream id -> the index of its next frame
        # Keys whose mailbox went unread past the TTL, and when: a late subscriber is told, not left waiting.
        self.expired: dict[str, float] = {}

    def gather(self, step: RenderStep, result: RenderResult) -> Gathered:
        """What of a rendered step goes to mailboxes: its keyed starts, frames (copied on the device, so the
        engine may render the next step into the same buffers) and ends. Reads `keys` only (a stream starts in an
        earlier delivery or in this step), so it may run off the loop between deliveries."""
        starts = [
            (s.stream_id, s.audio_key, s.history.frames_made if s.history else 0) for s in step.starts if s.audio_key
        ]
        keyed = set(self.keys.copy()) | {s for s, _, _ in starts}
        rows = [(row, s) for row, s in enumerate(step.ids) if s in keyed]
        ends = [s for s in step.ends if s in keyed]
        if not rows or result.audio is None:
            return Gathered(starts, [], None, (0, 0), ends)
        parts = (result.audio, result.latents, result.semantic)
        if len(rows) < len(step.ids):
            index = device_tensor([row for row, _ in rows], result.audio.device)
            parts = tuple(t.index_select(0, index) for t in parts)
        a = parts[0].shape[1]
        return Gathered(starts, [s for _, s in rows], torch.cat(parts, dim=1), (a, a + parts[1].shape[1]), ends)

    def deliver(self, routed: Routed) -> None:
        self.sweep()
        for stream, key, first in routed.starts:
            self.keys[stream] = key
            self.counts[stream] = first
            box = self.boxes.setdefault(key, _Mailbox(time.monotonic()))
            box.started = True
            box.wake.set()
        for stream, frame in routed.frames:
            if stream not in self.counts:  # ended, or lost, since the frame was rendered
                continue
            index = self.counts[stream]
            self.counts[stream] = index + 1
            box = self.boxes.get(self.keys[stream])
            if box is not None:
                box.put(AudioFrame(index, frame.audio, frame.latent, frame.semantic), self.cap)
        for stream in routed.ends:
            self.end(stream)

    def behind(self, streams: Iterable[int]) -> list[int]:
        """Those of `streams` (engine stream ids) whose subscriber has fallen behind: over `lead` frames unread,
        and until it is down to `resume`."""
        out = []
        for stream in streams:
            key = self.keys.get(stream)
            box = self.boxes.get(key) if key is not None else None
            if box is None or not box.subscribed:
                continue
            box.behind = len(box.frames) > (self.resume if box.behind else self.lead)
            if box.behind:
                out.append(stream)
        return out

    def end(self, stream: int, error: RequestError | None = None) -> None:
        """The stream is done (or lost, with `error`): its mailbox closes after the frames it holds."""
        key = self.keys.pop(stream, None)
        self.counts.pop(stream, None)
        box = self.boxes.get(key) if key is not None else None
        if box is not None:
            box.close(error)

    def sweep(self) -> None:
        """Mailboxes nobody subscribed to within the TTL are dropped."""
        now = time.monotonic()
        for key in [k for k, b in self.boxes.items() if not b.subscribed and now - b.created > self.ttl_s]:
            del self.boxes[key]
            self.expired[key] = now
        for key in [k for k, t in self.expired.items() if now - t > self.ttl_s]:
            del self.expired[key]

    async def subscribe(self, key: str) -> AsyncIterator[AudioFrame]:
        """The key's frames in order, until its stream ends. RequestError: a bad key, a second subscriber, a key
        whose stream started and went unread past the TTL, or the stream failed."""
        checked_key(key)
        self.sweep()
        if key in self.expired:
            raise status_error(
                code_pb2.NOT_FOUND, f"audio_key: its stream started over {self.ttl_s:.0f} s ago with nobody reading"
            )
        box = self.boxes.setdefault(key, _Mailbox(time.monotonic()))
        if box.subscribed:
            raise invalid_argument("audio_key", "the key already has a subscriber")
        box.subscribed = True
        try:
            while True:
                if box.frames:
                    yield box.frames.popleft()
                    continue
                if box.error is not None:
                    raise box.error
                if box.ended:
                    return
                box.wake.clear()
                await box.wake.wait()
        finally:
            if self.boxes.get(key) is box:
                del self.boxes[key]

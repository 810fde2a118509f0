"""A one-shot profile of the llm's steps under load: the first steps that carry a prompt chunk while streams
play (`vvmesh serve llm --profile-dir DIR`), or, with `--profile-min-playing 0 --profile-min-prompt N`, the
first steps of a lone prompt of N tokens or more.

Those steps are what real-time capacity and time to first audio hang on (README, "Through Envoy and the whole
mesh"), and the step log only says how long they took. The profile says where the time went, host and device:
`llm-steps.json` (a Chrome trace: open it in chrome://tracing or Perfetto) and `llm-steps.txt` (the operators
that took the most time on the host and on the device). It records every thread, so the step's own thread and
the event loop that serves the streams both show.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

PROFILED_STEPS = 20
MIN_PLAYING = 8  # decoding streams a step must have to be profiled: the load under which chunks hurt
TABLE_ROWS = 40


class StepProfile:
    def __init__(
        self, directory: str | None, steps: int = PROFILED_STEPS, min_playing: int = MIN_PLAYING, min_prompt: int = 1
    ) -> None:
        self.directory = Path(directory) if directory else None
        self.steps = steps
        self.min_playing = min_playing
        self.min_prompt = max(1, min_prompt)  # tokens of the longest prompt a step prefills
        self.left = steps if directory else 0  # steps still to record
        self._profile: profile | None = None

    @property
    def waiting(self) -> bool:
        """Whether it still waits for its first step (so the caller need not look at its streams otherwise)."""
        return self._profile is None and self.left > 0

    @contextlib.contextmanager
    def around(self, prompt_tokens: int, playing: int) -> Iterator[None]:
        """Run one step, recorded if the profile waits for a step like it or has begun. `prompt_tokens`: the
        longest prompt the step prefills (0: none)."""
        if self.waiting and prompt_tokens >= self.min_prompt and playing >= self.min_playing:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profile = profile(activities=activities, record_shapes=True)
            self._profile.__enter__()
            log.info("profiling %d llm steps from one with a prompt chunk and %d streams playing", self.left, playing)
        try:
            yield
        finally:
            if self._profile is not None:
                self.left -= 1
                if self.left == 0:
                    self._finish()

    def _finish(self) -> None:
        recorded, self._profile = self._profile, None
        recorded.__exit__(None, None, None)
        try:
            self._write(recorded)
        except OSError as e:  # a diagnostic: the streams go on without it
            log.warning("profile of %d llm steps not written to %s: %s", self.steps, self.directory, e)

    def _write(self, recorded: profile) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        recorded.export_chrome_trace(str(self.directory / "llm-steps.json"))
        averages = recorded.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)]
        if torch.cuda.is_available():
            tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS))
        (self.directory / "llm-steps.txt").write_text("\n\n".join(tables))
        log.info("profile of %d llm steps written to %s", self.steps, self.directory)

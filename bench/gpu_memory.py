"""Peak GPU memory of each service process, sampled from outside with nvidia-smi while a bench runs.

The services are separate processes, so their own allocator counters cannot be read from the bench. nvidia-smi
gives each process's device memory (CUDA context, weights, the KV pool, the allocator's cache) and the GPU's
total. Where the processes live in another PID namespace than the one nvidia-smi reports, only the totals are
known, and the per-service figures stay empty.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable


def _query(args: list[str]) -> list[list[str]]:
    try:
        out = subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):  # no NVIDIA driver, or it hangs: this sample is skipped
        return []
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


class GpuMemorySampler:
    """Samples every `period_s` until stopped; `pids()` names the services' current processes (a restarted
    service gets a new pid, and its peak is the larger of both lives)."""

    def __init__(self, pids: Callable[[], dict[int, str]], period_s: float = 0.5) -> None:
        self.pids = pids
        self.period_s = period_s
        self.peak_mib: dict[str, int] = {}
        self.peak_total_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        names = self.pids()
        for pid, used in _query(["--query-compute-apps=pid,used_memory"]):
            if pid.isdigit() and used.isdigit() and int(pid) in names:
                name = names[int(pid)]
                self.peak_mib[name] = max(self.peak_mib.get(name, 0), int(used))
        for (used,) in _query(["--query-gpu=memory.used"])[:1]:
            if used.isdigit():
                self.peak_total_mib = max(self.peak_total_mib, int(used))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        gib = {name: round(mib / 1024, 2) for name, mib in sorted(self.peak_mib.items())}
        return {"peak_gib_by_service": gib, "peak_gib_whole_gpu": round(self.peak_total_mib / 1024, 2)}

"""Where a step's GPU time goes, kernel by kernel: a profile of whole steps as they run (CUDA-graph replays
included), summed per kernel name and per kind of kernel.

The gap between a step's wall time and the time its kernels keep the GPU busy is what launches, host work and
waits cost; the kernels' own time splits into matmuls, attention, compiled fusions and the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# A kernel's kind, by the first pattern its name contains (lower case).
KINDS = (
    ("attention", ("_split_kernel", "_prefill_kernel", "_combine", "flash", "fmha", "attention")),
    ("convnext block", ("_block_kernel",)),
    ("matmul", ("gemm", "gemv", "cutlass", "sm90_", "sm80_", "cublas", "matmul", "splitk")),
    ("convolution", ("conv", "cudnn", "implicit")),
    ("compiled fusion", ("triton_",)),
    ("copy", ("memcpy", "memset", "copy", "cat", "index")),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, patterns in KINDS:
        if any(p in lower for p in patterns):
            return kind
    return "other"


def profile_steps(step: Callable[[], object], steps: int, top: int = 15, trace: str | None = None) -> dict:
    """Run `step` `steps` times under the profiler; per step: wall ms, kernels, their summed and busy ms (the
    union of their intervals), the time by kind, and the `top` kernels by time. `trace`: also write the profile
    there as a Chrome trace (host and device on one timeline: chrome://tracing or Perfetto), which shows what
    the GPU waits for between its busy spans."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    if trace:
        prof.export_chrome_trace(trace)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, reach = 0.0, float("-inf")
    for a, b in intervals:
        if b > reach:
            busy += b - max(a, reach)
            reach = b
    by_name: dict[str, list[float]] = defaultdict(list)
    by_kind: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[e.name].append(e.device_time)
        by_kind[kind_of(e.name)] += e.device_time
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "wall_ms": wall_ms,
        "kernels": len(kernels) / steps,
        "kernel_ms": sum(e.device_time for e in kernels) / steps / 1000,
        "busy_ms": busy / steps / 1000,
        "by_kind_ms": {k: v / steps / 1000 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": name[:90], "per_step": len(times) / steps, "ms": sum(times) / steps / 1000, "kind": kind_of(name)}
            for name, times in ranked
        ],
    }

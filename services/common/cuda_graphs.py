"""Capturing a fixed-shape step as a CUDA graph: no Python or launch overhead when it is replayed.

The step reads and writes only persistent tensors (inputs are copied into them before a replay, outputs
are read from them after), so one captured graph per batch-size bucket serves every later step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_for(n: int, limit: int) -> int:
    for b in BUCKETS:
        if b >= n:
            return min(b, limit) if b > limit >= n else b
    return n


def buckets_up_to(limit: int) -> list[int]:
    out = [b for b in BUCKETS if b < limit]
    return [*out, limit]


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream() -> torch.cuda.Stream:
    # One stream for every warm-up and capture: each stream that runs matmuls gets its own cuBLAS workspace.
    device = torch.device("cuda", torch.cuda.current_device())
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class CapturedStep:
    """`step()` captured once (after warm-up on a side stream) and replayed.

    Graphs of one engine share a memory `pool`: they are replayed one at a time and keep nothing in their
    intermediates between replays, so one pool the size of the largest serves every bucket.
    """

    def __init__(self, step: Callable[[], object], pool=None, warmup: int = 2) -> None:
        stream = _side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.outputs = step()

    def replay(self):
        self.graph.replay()
        return self.outputs


@contextlib.contextmanager
def cudnn_enabled(enabled: bool):
    previous = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = previous


def replay_ms(step: CapturedStep, replays: int = 5) -> float:
    step.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        step.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays * 1000


def capture_fastest_convolutions(step: Callable[[], object], pool=None) -> tuple[CapturedStep, bool]:
    """Captures `step` with cuDNN's convolutions and with PyTorch's own, keeps the faster; returns it and
    whether it uses cuDNN. For one frame's short convolutions at small batches the layout conversions cuDNN
    adds around them can cost more than the convolutions; at large batches cuDNN wins. Measured per bucket
    at start-up, on the GPU at hand."""
    timed = []
    for use_cudnn in (True, False):
        with cudnn_enabled(use_cudnn):
            captured = CapturedStep(step, pool)
        timed.append((replay_ms(captured), use_cudnn, captured))
        del captured
    _, use_cudnn, fastest = min(timed, key=lambda t: t[0])
    return fastest, use_cudnn


def compiled(fn: Callable) -> Callable:
    """`torch.compile` for code that runs inside our own captured graphs.

    Inductor fuses the small elementwise and normalization kernels that dominate a step once launch overhead
    is gone; capture stays with `CapturedStep` (not mode="reduce-overhead") because the steps update persistent
    state tensors in place. Sizes that differ between calls (batch buckets, ConvNeXt stages) make the compiled
    code shape-generic after the second size, so a handful of compilations cover every bucket.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, fullgraph=True)

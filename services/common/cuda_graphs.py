"""Capturing a fixed-shape step as a CUDA graph: no Python or launch overhead when it is replayed.

The step reads and writes only persistent tensors (inputs are copied into them before a replay, outputs
are read from them after), so one captured graph per batch-size bucket serves every later step.
"""

from __future__ import annotations

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


class CapturedStep:
    """`step()` captured once (after warm-up on a side stream) and replayed."""

    def __init__(self, step: Callable[[], object], pool=None, warmup: int = 2) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = step()

    def replay(self):
        self.graph.replay()
        return self.outputs

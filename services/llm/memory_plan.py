"""How many KV pages the llm plans at start-up, and how many streams of a given length they hold.

One place for the arithmetic, used by the engine when it sizes its pool and by `vvmesh capacity`, which
answers the same question for a GPU that is not at hand (an A10G of 24 GB, say).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common import stream_size
from services.llm.block_manager import pages_for

BRANCHES = 3  # positive, speech-CFG negative, token-CFG unconditional (services/llm/engine.py)
ACTIVATION_RESERVE = 0.05  # of the planned memory, kept for the captured graphs' activations and workspaces


def expected_pages(prompt_tokens: int, frames: int, page_size: int) -> int:
    return sum(pages_for(n, page_size) for n in stream_size.expected_branch_positions(prompt_tokens, frames))


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    def page_bytes(self, page_size: int) -> int:
        return self.layers * 2 * self.kv_heads * page_size * self.head_dim * self.dtype_bytes  # K and V


def ceiling_pages(max_streams: int, max_len: int, page_size: int) -> int:
    """Pages every stream at the full context could hold, the scratch page included: more is never useful."""
    return max_streams * BRANCHES * pages_for(max_len, page_size) + 1


def planned_pages(
    total_bytes: int,
    memory_fraction: float,
    in_use_bytes: int,
    page_bytes: int,
    ceiling: int,
) -> int:
    """Pages for the share of the GPU this process plans, less what it already holds (weights) and a reserve
    for activations; never more than `ceiling` (what every stream at the full context could hold)."""
    budget = int(total_bytes * memory_fraction * (1 - ACTIVATION_RESERVE)) - in_use_bytes
    return max(0, min(ceiling, budget // page_bytes))


def streams_that_fit(pages: int, page_size: int, prompt_tokens: int, frames: int) -> int:
    """Streams of this size the pool holds at once (the scratch page aside)."""
    return max(0, pages - 1) // expected_pages(prompt_tokens, frames, page_size)


def cpu_pages(page_bytes: int, max_len: int, page_size: int, floor_bytes: int) -> int:
    """The pool on a CPU: `floor_bytes`, or room for one stream at the full context if that is more, within a
    quarter of the machine's memory."""
    one_stream = ceiling_pages(1, max_len, page_size) * page_bytes
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(2, max(floor_bytes, min(one_stream, memory // 4)) // page_bytes)

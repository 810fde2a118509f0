"""Which KV pages are free, which stream branch holds which, and what admitted streams were promised.

The KV pool (`services/llm/paged_kv.py`) is cut into pages of `page_size` positions. A stream's three
branches (positive, negative, unconditional; see `services/llm/engine.py`) each hold a list of pages: page i
of a branch holds its positions [i * page_size, (i + 1) * page_size). A branch takes a page when it first
writes a position on it, and the negative branch gives its pages back at every audio_bos, since the
reference restarts that branch with each speech segment.

Admission reserves the pages a stream is expected to need, so that streams already running can grow into
their reservation while new ones are refused. A stream that outgrows its reservation takes unreserved free
pages; when there are none the scheduler must make room (swap a stream out) before the step.

This module holds no tensors: it answers with page numbers, and the engine writes them into the page table.
Page 0 is never handed out: it is the scratch page that padding rows of a fixed-size batch write to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCRATCH_PAGE = 0


def pages_for(positions: int, page_size: int) -> int:
    return -(-positions // page_size)


@dataclass(eq=False)
class StreamPages:
    branches: list[list[int]]
    reserved: int = 0  # pages still promised to this stream and not yet taken

    @property
    def held(self) -> int:
        return sum(len(b) for b in self.branches)


@dataclass
class BlockManager:
    pages: int  # in the pool, the scratch page included
    page_size: int
    branches: int = 3
    free: list[int] = field(init=False)
    reserved: int = field(init=False, default=0)  # promised to admitted streams, not yet taken

    def __post_init__(self) -> None:
        if self.pages < 2:
            raise ValueError(f"a KV pool of {self.pages} pages has no page beside the scratch page")
        # Popped from the end: low page numbers first, which keeps a small workload's pages together.
        self.free = list(range(self.pages - 1, SCRATCH_PAGE, -1))

    @property
    def usable(self) -> int:
        return self.pages - 1

    @property
    def available(self) -> int:
        """Free pages that no admitted stream was promised."""
        return len(self.free) - self.reserved

    def pages_for(self, positions: int) -> int:
        return pages_for(positions, self.page_size)

    def admit(self, expected_pages: int) -> StreamPages | None:
        """A new stream's record with `expected_pages` reserved, or None when they are not free."""
        if expected_pages > self.available:
            return None
        self.reserved += expected_pages
        return StreamPages([[] for _ in range(self.branches)], expected_pages)

    def grow(self, stream: StreamPages, branch: int, positions: int) -> list[tuple[int, int]] | None:
        """Give `branch` pages for its first `positions` positions. Returns the new (page index, page) pairs,
        or None, holding nothing new, when the pool has no page the stream may take."""
        held = stream.branches[branch]
        need = self.pages_for(positions) - len(held)
        if need <= 0:
            return []
        from_reservation = min(need, stream.reserved)
        if need - from_reservation > self.available:
            return None
        stream.reserved -= from_reservation
        self.reserved -= from_reservation
        new = [(len(held) + i, self.free.pop()) for i in range(need)]
        held.extend(page for _, page in new)
        return new

    def short(self, stream: StreamPages, positions: list[int]) -> int:
        """Pages beyond its reservation that `stream` would take to hold `positions[b]` positions in branch b."""
        need = sum(max(0, self.pages_for(p) - len(held)) for p, held in zip(positions, stream.branches, strict=True))
        return max(0, need - stream.reserved)

    def shrink(self, stream: StreamPages, branch: int, positions: int) -> None:
        """Keep only the pages `branch` needs for its first `positions` positions."""
        held = stream.branches[branch]
        keep = self.pages_for(positions)
        self.free.extend(reversed(held[keep:]))
        del held[keep:]

    def release(self, stream: StreamPages) -> None:
        """Every page and every promised page of the stream goes back to the pool."""
        for branch in range(self.branches):
            self.shrink(stream, branch, 0)
        self.reserved -= stream.reserved
        stream.reserved = 0

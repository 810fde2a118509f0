"""The KV page accounting: reservations, growth past them, the negative branch's restarts, and release."""

from __future__ import annotations

import pytest

from services.llm.block_manager import SCRATCH_PAGE, BlockManager


def test_admission_reserves_pages_and_refuses_what_is_promised_elsewhere():
    blocks = BlockManager(pages=11, page_size=16)  # 10 usable
    first = blocks.admit(6)
    assert first is not None and blocks.available == 4
    assert blocks.admit(5) is None  # free pages exist, but 6 of the 10 are promised to the first stream
    second = blocks.admit(4)
    assert second is not None and blocks.available == 0
    # The first stream grows into its own reservation even though nothing is available to others.
    new = blocks.grow(first, 0, 5 * 16)
    assert [index for index, _ in new] == [0, 1, 2, 3, 4] and first.reserved == 1
    assert SCRATCH_PAGE not in [page for _, page in new]


def test_growth_past_the_reservation_takes_unpromised_pages_or_nothing():
    blocks = BlockManager(pages=6, page_size=4)  # 5 usable
    stream = blocks.admit(2)
    assert blocks.grow(stream, 0, 8) == [(0, 1), (1, 2)]  # its reservation, low pages first
    assert len(blocks.grow(stream, 1, 12)) == 3  # past it: the three unpromised pages
    assert blocks.grow(stream, 2, 1) is None  # nothing left, and nothing was taken
    assert stream.branches[2] == [] and blocks.available == 0
    assert blocks.grow(stream, 0, 7) == []  # positions it already has pages for


def test_a_restarted_branch_and_a_released_stream_give_every_page_back():
    blocks = BlockManager(pages=9, page_size=4)
    stream = blocks.admit(3)
    blocks.grow(stream, 0, 8)
    blocks.grow(stream, 1, 16)  # the negative branch's segment: 4 pages
    blocks.shrink(stream, 1, 1)  # audio_bos: it keeps the page its next position goes to
    assert len(stream.branches[1]) == 1 and len(blocks.free) == 8 - 2 - 1
    blocks.release(stream)
    assert sorted(blocks.free) == list(range(1, 9)) and blocks.reserved == 0 and blocks.available == 8


def test_a_pool_needs_a_page_beside_the_scratch_page():
    with pytest.raises(ValueError, match="scratch"):
        BlockManager(pages=1, page_size=16)

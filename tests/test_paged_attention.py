"""The paged decode and prefill kernels and the prompt chunks' attention equal plain attention over the same page
table: any page size, any split count, rows of very different lengths, pages scattered over the pool, chunks
padded to a fixed size."""

from __future__ import annotations

import os

import pytest
import torch

from services.llm import paged_attention
from services.llm.paged_kv import PagedKV, causal_visibility, gathered, prompt_chunk

needs_kernel = pytest.mark.skipif(
    not paged_attention.available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the paged decode kernel needs Triton, on a GPU or with TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled_pool(page_size: int, lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype):
    g = torch.Generator().manual_seed(page_size)
    pages = sum(-(-n // page_size) for n in lengths) + 8
    kv = PagedKV(1, kv_heads, head_dim, pages, len(lengths), 1024, DEVICE, dtype, page_size)
    kv.k[0].copy_(torch.randn(kv.k[0].shape, generator=g))
    kv.v[0].copy_(torch.randn(kv.v[0].shape, generator=g))
    free = torch.randperm(pages - 1, generator=g).add(1).tolist()  # page 0 is scratch
    kv.set_pages([(r, i, free.pop()) for r, n in enumerate(lengths) for i in range(-(-n // page_size))])
    q = torch.randn(len(lengths), heads, 1, head_dim, generator=g).to(DEVICE, dtype)
    return kv, q


@needs_kernel
@pytest.mark.parametrize("page_size", [4, 128])
@pytest.mark.parametrize("splits", [1, 4, None])
@pytest.mark.parametrize("head_dim", [32, 24])  # 24: a head whose lanes the kernel pads to a power of two
def test_paged_decode_equals_gathered_attention(page_size, splits, head_dim):
    lengths = [300, 1, 130, 9, 5, 256, 127, 128, 2]
    kv, q = filled_pool(page_size, lengths, heads=6, kv_heads=2, head_dim=head_dim, dtype=torch.float32)
    rows = torch.arange(len(lengths), device=DEVICE)
    keys = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    window = max(lengths)
    visible = causal_visibility(window, (keys - 1).long()[:, None])
    expected = gathered(q, kv.k[0], kv.v[0], kv.gather_index(rows, window), visible, 0.3)
    out = paged_attention.paged_decode(q, kv.k[0], kv.v[0], kv.page_table, keys, 0.3, page_size, splits)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4), (out - expected).abs().max()
    # A row reads only its own pages: row 1 (one position) is its first value, whatever the others hold.
    first = kv.v[0][0][:, kv.page_table[1, 0].item() * page_size]  # (kv_heads, head_dim)
    assert torch.allclose(out[1, :, 0], first.repeat_interleave(3, dim=0), atol=1e-6)


def test_splits_fill_the_gpu_and_never_exceed_a_rows_blocks():
    assert paged_attention.splits_for(rows=3, kv_heads=2, max_len=65_536, sm_count=132) == 128
    assert paged_attention.splits_for(rows=192, kv_heads=2, max_len=65_536, sm_count=132) == 4
    assert paged_attention.splits_for(rows=768, kv_heads=2, max_len=65_536, sm_count=132) == 1
    assert paged_attention.splits_for(rows=3, kv_heads=2, max_len=300, sm_count=132) == 2
    # A 512-token chunk of 1.5B: 32 query blocks of 16 positions (6 heads padded to 8) for each of 2 KV heads.
    assert paged_attention.prefill_splits_for(programs=64, sm_count=132) == 2
    assert paged_attention.prefill_splits_for(programs=4096, sm_count=132) == 1


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], scale: float):
    """q (heads, T, d) at `positions` over a row's keys k, v (kv_heads, keys, d), written out by hand."""
    k, v = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0), v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
    out = torch.empty_like(q)
    for t, p in enumerate(positions):
        weights = torch.softmax((q[:, t : t + 1] @ k[:, : p + 1].transpose(1, 2)) * scale, dim=-1)
        out[:, t] = (weights @ v[:, : p + 1])[:, 0]
    return out


@pytest.mark.parametrize("page_size", [4, 128])
def test_a_padded_prompt_chunk_attends_causally_to_its_row_only(page_size):
    """A chunk of 45 tokens padded to 64 queries, over the row's keys up to a bucket past its end (pages it does
    not hold read the scratch page): its real queries get exactly the attention of the chunk over its row."""
    kv, _ = filled_pool(page_size, [300, 200], heads=6, kv_heads=2, head_dim=32, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 64, 32, generator=g).to(DEVICE)
    real = torch.arange(64, device=DEVICE) < 45
    positions = (255 + torch.where(real, torch.arange(64, device=DEVICE), 0))[None]
    bucket = 512
    out = gathered(
        q,
        kv.k[0],
        kv.v[0],
        kv.gather_index(torch.tensor([0], device=DEVICE), bucket),
        causal_visibility(bucket, positions),
        0.3,
    )
    row = kv.gather_index(torch.tensor([0], device=DEVICE), 300)[0]
    expected = plain_attention(q[0, :, :45], kv.k[0][0][:, row], kv.v[0][0][:, row], list(range(255, 300)), 0.3)
    assert torch.allclose(out[0, :, :45], expected, atol=1e-5, rtol=1e-4), (out[0, :, :45] - expected).abs().max()


@pytest.mark.parametrize("page_size", [4, 128])
def test_a_prompt_chunk_attends_causally_to_its_row_only(page_size):
    """A launched prefill chunk (the last T of a row's first `keys` positions) equals masked attention over the row."""
    kv, _ = filled_pool(page_size, [300, 200], heads=6, kv_heads=2, head_dim=32, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 45, 32, generator=g).to(DEVICE)
    rows = torch.tensor([0], device=DEVICE)
    positions = torch.arange(255, 300, device=DEVICE)[None]
    index = kv.gather_index(rows, 300)
    expected = gathered(q, kv.k[0], kv.v[0], index, causal_visibility(300, positions), 0.3)
    out = prompt_chunk(q, kv.k[0], kv.v[0], index, 0.3)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4), (out - expected).abs().max()


@needs_kernel
@pytest.mark.parametrize("page_size", [4, 128])
@pytest.mark.parametrize(
    ("start", "tokens", "queries", "head_dim"),
    [(255, 45, 64, 32), (0, 70, 70, 32), (120, 1, 16, 32), (200, 33, 40, 24)],
)
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_the_prefill_kernel_attends_causally_to_its_row_through_the_page_table(
    page_size, start, tokens, queries, head_dim, splits
):
    """The captured chunks' kernel: a chunk of `tokens` from `start`, padded to `queries` (padding at `start`, as
    the engine pads), over row 0's pages scattered in the pool; the other row's keys never leak in. With its keys
    split, early queries see no key of the last splits, and at 16 some splits hold no block at all."""
    kv, _ = filled_pool(page_size, [300, 200], heads=6, kv_heads=2, head_dim=head_dim, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, queries, head_dim, generator=g).to(DEVICE)
    offsets = torch.arange(queries, device=DEVICE)
    positions = start + torch.where(offsets < tokens, offsets, 0)
    tiles = paged_attention.PrefillTiles(splits=splits)
    out = paged_attention.paged_prefill(q, kv.k[0], kv.v[0], kv.page_table[0], positions, 0.3, page_size, tiles)
    row = kv.gather_index(torch.tensor([0], device=DEVICE), 300)[0]
    expected = plain_attention(q[0], kv.k[0][0][:, row], kv.v[0][0][:, row], positions.tolist(), 0.3)
    assert torch.allclose(out[0], expected, atol=1e-5, rtol=1e-4), (out[0] - expected).abs().max()

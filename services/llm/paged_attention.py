"""Attention over the paged KV pool, reading only the positions a row holds: decode and prompt chunks.

A Triton kernel in two passes ("flash decoding"). The first splits each row's positions into `splits` equal
ranges of whole blocks; one program per (row, KV head, split) reads its blocks through the row's page table,
for all the query heads that share the KV head at once (grouped-query attention), and keeps an online softmax.
The second combines the splits. The work per row follows the row's own length, so a stream at position 100
costs a hundredth of one at 10,000, whatever the configured context; the grid depends only on the batch, so
the launch is captured in the decode step's CUDA graphs. Triton comes with PyTorch's CUDA builds and compiles
for the GPU it finds, with no CUDA toolkit on the user's machine.

`paged_prefill` is the same for a chunk of one row's prompt: many queries, each attending to the row's positions
up to its own, its keys split in the same way and combined by the same second kernel. It reads the positions
through the page table too, so a captured chunk's graph serves every chunk, wherever it starts, without
gathering keys or masks sized to the context.

The same semantics in plain PyTorch (each row's positions gathered, then SDPA) are `paged_kv.gathered`, which
CPU steps use; the tests hold the three equal over one page table.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton; they use `paged_kv.gathered`
    triton = None

BLOCK = 128  # positions per inner step; any page size works, since each position looks up its own page
TARGET_PROGRAMS_PER_SM = 12  # measured on an H100: ~12 programs per SM gives the lowest decode time, batch 1-256
MAX_SPLITS = 128  # the most measured (best at batch 1); the rule alone would pick 256 there
# A prompt chunk's program holds 128 query rows on 8 warps, so one fills an SM's warps where decode's fit 12.
# Measured on an H100 (`bench/attention_bench.py --prefill`): with that shape 1.5B's 512-token chunk is fastest
# at 2 splits, which this gives, at starts 0 to 12,043, and within 1% of the best (4) at 30,000.
PREFILL_PROGRAMS_PER_SM = 1


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """The decode kernel's launch shape: positions per inner step, warps per program, pipelined loads."""

    block: int = BLOCK
    warps: int = 4
    stages: int = 3


def available() -> bool:
    return triton is not None


def _dim_pad(head_dim: int) -> int:
    """The head's lanes in a tile: a power of two, at least the 16 a matrix instruction takes."""
    return max(16, 1 << (head_dim - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def splits_for(rows: int, kv_heads: int, max_len: int, sm_count: int) -> int:
    """Splits per row: the largest power of two that keeps programs at or under the target per SM (at least
    one), never more than a row's blocks or MAX_SPLITS."""
    wanted = max(1, TARGET_PROGRAMS_PER_SM * sm_count // (rows * kv_heads))
    return _power_of_two_at_most(min(wanted, max(1, -(-max_len // BLOCK)), MAX_SPLITS))


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


if triton is not None:

    @triton.jit
    def _attend_block(
        q,
        k_base,
        v_base,
        table,
        key,
        held,
        visible,
        d,
        dim,
        best,
        total,
        acc,
        scale,
        kv_stride_n,
        PAGE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One block of keys into an online softmax, for both kernels: the positions `key` that are `held` are read
        through the page table `table`; scores count where `visible` (queries x keys); returns the running max,
        sum and output."""
        page = tl.load(table + key // PAGE, mask=held, other=0)
        at = (page.to(tl.int64) * PAGE + key % PAGE) * kv_stride_n
        k = tl.load(k_base + at[:, None] + d[None, :], mask=held[:, None] & dim[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(visible, s, float("-inf"))
        new_best = tl.maximum(best, tl.max(s, 1))
        # A query that sees none of its keys yet (a prefill split past its position) keeps a max of -inf; its
        # exponentials are taken against 0 so they are 0, not NaN.
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        rescale = tl.exp(best - shift)
        p = tl.exp(s - shift[:, None])
        total = total * rescale + tl.sum(p, 1)
        v = tl.load(v_base + at[:, None] + d[None, :], mask=held[:, None] & dim[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return new_best, total, acc

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        lengths_ptr,
        acc_ptr,
        max_ptr,
        sum_ptr,
        out_ptr,
        q_stride_r,
        q_stride_h,
        kv_stride_h,
        kv_stride_n,
        table_stride_r,
        out_stride_r,
        out_stride_h,
        scale,
        HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lengths_ptr + row)
        blocks = tl.cdiv(length, BLOCK_N)
        per_split = tl.cdiv(blocks, SPLITS)
        first = split * per_split
        last = tl.minimum(first + per_split, blocks)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)  # a power of two; the lanes past HEAD_DIM are masked
        dim = d < HEAD_DIM
        n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + g
        in_group = g < GROUP
        q = tl.load(
            q_ptr + row * q_stride_r + heads[:, None] * q_stride_h + d[None, :],
            mask=in_group[:, None] & dim[None, :],
            other=0.0,
        )
        k_base = k_ptr + kv_head.to(tl.int64) * kv_stride_h
        v_base = v_ptr + kv_head.to(tl.int64) * kv_stride_h
        table = table_ptr + row.to(tl.int64) * table_stride_r

        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        for b in range(first, last):
            pos = b * BLOCK_N + n
            valid = pos < length
            best, total, acc = _attend_block(
                q,
                k_base,
                v_base,
                table,
                pos,
                valid,
                valid[None, :],
                d,
                dim,
                best,
                total,
                acc,
                scale,
                kv_stride_n,
                PAGE,
                PRECISION,
            )

        if SPLITS == 1:  # the only split: normalize and write the output directly
            out = acc / total[:, None]
            at = out_ptr + row * out_stride_r + heads[:, None] * out_stride_h + d[None, :]
            tl.store(at, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None] & dim[None, :])
        else:
            index = (row * HEADS + heads) * SPLITS + split
            tl.store(acc_ptr + index[:, None] * HEAD_DIM + d[None, :], acc, mask=in_group[:, None] & dim[None, :])
            tl.store(max_ptr + index, best, mask=in_group)
            tl.store(sum_ptr + index, total, mask=in_group)

    @triton.jit
    def _combine_kernel(
        acc_ptr,
        max_ptr,
        sum_ptr,
        out_ptr,
        out_stride_r,
        out_stride_h,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, DIM_PAD)  # a power of two; the lanes past HEAD_DIM are masked
        dim = d < HEAD_DIM
        index = (row * HEADS + head) * SPLITS + s
        best = tl.load(max_ptr + index)
        total = tl.load(sum_ptr + index)
        overall = tl.max(best, 0)
        weight = tl.where(best == float("-inf"), 0.0, tl.exp(best - overall))  # splits with no positions: 0
        acc = tl.load(acc_ptr + index[:, None] * HEAD_DIM + d[None, :], mask=dim[None, :], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
        tl.store(out_ptr + row * out_stride_r + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty), mask=dim)

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        positions_ptr,
        acc_ptr,
        max_ptr,
        sum_ptr,
        out_ptr,
        q_stride_h,
        q_stride_t,
        kv_stride_h,
        kv_stride_n,
        out_stride_h,
        out_stride_t,
        tokens,
        scale,
        HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program: BLOCK_M queries of the chunk times the GROUP query heads of one KV head, as one tile, so
        # each key and value is read once for the group; over one of SPLITS equal ranges of the keys' blocks.
        block = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        r = tl.arange(0, BLOCK_M * GROUP_PAD)
        t = block * BLOCK_M + r // GROUP_PAD
        g = r % GROUP_PAD
        heads = kv_head * GROUP + g
        real = (t < tokens) & (g < GROUP)
        d = tl.arange(0, DIM_PAD)  # a power of two; the lanes past HEAD_DIM are masked
        dim = d < HEAD_DIM
        n = tl.arange(0, BLOCK_N)
        # A query past the chunk reads position 0's row prefix: finite, and never stored.
        pos = tl.load(positions_ptr + t, mask=t < tokens, other=0)
        q = tl.load(
            q_ptr + heads[:, None] * q_stride_h + t[:, None] * q_stride_t + d[None, :],
            mask=real[:, None] & dim[None, :],
            other=0.0,
        )
        k_base = k_ptr + kv_head.to(tl.int64) * kv_stride_h
        v_base = v_ptr + kv_head.to(tl.int64) * kv_stride_h
        last = tl.max(pos, 0)
        blocks = tl.cdiv(last + 1, BLOCK_N)
        per_split = tl.cdiv(blocks, SPLITS)

        best = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, DIM_PAD], tl.float32)
        for b in range(split * per_split, tl.minimum(split * per_split + per_split, blocks)):
            key = b * BLOCK_N + n
            best, total, acc = _attend_block(
                q,
                k_base,
                v_base,
                table_ptr,
                key,
                key <= last,
                key[None, :] <= pos[:, None],
                d,
                dim,
                best,
                total,
                acc,
                scale,
                kv_stride_n,
                PAGE,
                PRECISION,
            )

        if SPLITS == 1:  # the only split: normalize and write the output directly
            out = acc / total[:, None]
            at = out_ptr + heads[:, None] * out_stride_h + t[:, None] * out_stride_t + d[None, :]
            tl.store(at, out.to(out_ptr.dtype.element_ty), mask=real[:, None] & dim[None, :])
        else:  # the same layout as the decode splits', a chunk's query in place of a row
            index = (t * HEADS + heads) * SPLITS + split
            tl.store(acc_ptr + index[:, None] * HEAD_DIM + d[None, :], acc, mask=real[:, None] & dim[None, :])
            tl.store(max_ptr + index, best, mask=real)
            tl.store(sum_ptr + index, total, mask=real)


def _split_buffers(out: torch.Tensor, rows: int, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each split's unnormalized output, running max and sum for `rows` query rows of `out`'s heads (rows, heads,
    splits[, head_dim]), in float32; with one split the kernel writes `out` itself and these are not read."""
    if splits == 1:
        return out, out, out
    heads, head_dim = out.shape[1], out.shape[-1]
    acc = torch.empty((rows, heads, splits, head_dim), device=out.device, dtype=torch.float32)
    best = torch.empty((rows, heads, splits), device=out.device, dtype=torch.float32)
    return acc, best, torch.empty_like(best)


def _combine(acc, best, total, out: torch.Tensor, out_stride_r: int, out_stride_h: int) -> None:
    """The splits of every (query row, head) merged into `out`, whose row and head strides are given."""
    rows, heads, splits, head_dim = acc.shape
    _combine_kernel[(rows, heads)](
        acc,
        best,
        total,
        out,
        out_stride_r,
        out_stride_h,
        HEADS=heads,
        HEAD_DIM=head_dim,
        DIM_PAD=_dim_pad(head_dim),
        SPLITS=splits,
    )


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    page_size: int,
    splits: int | None = None,
    tiles: DecodeTiles = DecodeTiles(),
) -> torch.Tensor:
    """q (R, heads, 1, head_dim): row r attends to its positions [0, lengths[r]) (lengths >= 1), which live in
    the pool (1, kv_heads, N, head_dim) at `page_table[r, position // page_size]`. Returns (R, heads, 1, head_dim)."""
    if triton is None:
        raise RuntimeError("paged decode attention needs Triton (it comes with PyTorch's CUDA builds)")
    rows, heads, _, head_dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    if splits is None:
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 1
        splits = splits_for(rows, kv_heads, page_table.shape[1] * page_size, sms)
    out = torch.empty((rows, heads, 1, head_dim), device=q.device, dtype=q.dtype)
    acc, best, total = _split_buffers(out, rows, splits)
    _split_kernel[(rows, kv_heads, splits)](
        q,
        k_pool,
        v_pool,
        page_table,
        lengths,
        acc,
        best,
        total,
        out,
        q.stride(0),
        q.stride(1),
        k_pool.stride(1),
        k_pool.stride(2),
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        scale,
        HEADS=heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # the smallest tile a matrix instruction takes
        HEAD_DIM=head_dim,
        DIM_PAD=_dim_pad(head_dim),
        PAGE=page_size,
        BLOCK_N=tiles.block,
        SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tiles.warps,
        num_stages=tiles.stages,
    )
    if splits > 1:
        _combine(acc, best, total, out, out.stride(0), out.stride(1))
    return out


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """The prefill kernel's launch shape: query rows (chunk positions times grouped heads) a program holds, keys
    per inner step, warps per program, and splits of the keys (None: `prefill_splits_for`)."""

    rows: int = 128
    block: int = 64
    warps: int = 8
    splits: int | None = None


def prefill_splits_for(programs: int, sm_count: int) -> int:
    """Splits of a chunk's keys: the largest power of two that keeps programs at or under the target per SM (at
    least one). A chunk's programs are few (a 512-token chunk of 1.5B has 64), each walking every key before its
    queries' positions: alone they leave most of an SM's warps idle while they wait for keys."""
    return _power_of_two_at_most(min(PREFILL_PROGRAMS_PER_SM * sm_count // programs, MAX_SPLITS))


def paged_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    page_size: int,
    tiles: PrefillTiles = PrefillTiles(),
) -> torch.Tensor:
    """q (1, heads, T, head_dim): a chunk of one row's prompt, query t at `positions[t]`, attending to the row's
    positions [0, positions[t]], which live in the pool at `page_table[position // page_size]` (the row's table).
    The launch depends only on T, so one captured graph serves chunks at any position. Returns (1, heads, T,
    head_dim)."""
    if triton is None:
        raise RuntimeError("paged prefill attention needs Triton (it comes with PyTorch's CUDA builds)")
    _, heads, tokens, head_dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, tiles.rows // group_pad)
    query_blocks = triton.cdiv(tokens, block_m)
    splits = tiles.splits
    if splits is None:
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 1
        splits = prefill_splits_for(query_blocks * kv_heads, sms)
    out = torch.empty((1, heads, tokens, head_dim), device=q.device, dtype=q.dtype)
    acc, best, total = _split_buffers(out, tokens, splits)
    _prefill_kernel[(query_blocks, kv_heads, splits)](
        q,
        k_pool,
        v_pool,
        page_table,
        positions,
        acc,
        best,
        total,
        out,
        q.stride(1),
        q.stride(2),
        k_pool.stride(1),
        k_pool.stride(2),
        out.stride(1),
        out.stride(2),
        tokens,
        scale,
        HEADS=heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        DIM_PAD=_dim_pad(head_dim),
        PAGE=page_size,
        BLOCK_N=tiles.block,
        SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tiles.warps,
    )
    if splits > 1:  # the decode splits' combine, with the chunk's queries as its rows
        _combine(acc, best, total, out, out.stride(2), out.stride(1))
    return out

"""One layer's decode attention over the paged pool, by kernel (no model needed).

    python bench/attention_bench.py

The pool has the size the llm plans on an H200 for the 1.5B shape; rows are placed as in paged_bench's
cases (positive and unconditional branches at the stream's position, the negative one at a segment's).
Compared on the same pool and page table: the Triton paged decode kernel the decode graphs run (with the split
count it picks, and others), FlexAttention with a block mask made from the page table (its decoding kernel,
compiled per batch), and gathering each row's keys for SDPA. Prints ms per call and the bandwidth each reaches
over the keys and values the rows really hold.

    python bench/attention_bench.py --tiles

times the Triton kernel alone, replayed from a CUDA graph as the decode step runs it (so no launch cost), over
its launch shapes (positions per inner step, warps, pipelined loads) and split counts.

    python bench/attention_bench.py --prefill

times the prefill kernel the chunk graph runs: one 512-token chunk of a row's prompt at several starts (the
45-minute prompt's last chunk among them), replayed from CUDA graphs over its launch shapes and split counts,
against SDPA's flash kernel over the row's gathered keys (what a launched chunk runs) in the same run.
"""

from __future__ import annotations

import argparse
import itertools

import common
import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from services.llm import paged_attention, paged_kv

POOL_PAGES, HEADS, KV_HEADS, HEAD_DIM = 33_422, 12, 2, 128
CASES = {
    "b1@30K": [30_000],
    "b64@2K-30K": np.linspace(2_000, 30_000, 64).astype(int).tolist(),
    "b256@2K-6K": np.linspace(2_000, 6_000, 256).astype(int).tolist(),
}
SPLITS = (None, 1, 8, 32)  # None: the kernel's own choice
CHUNK = 512  # the chunk graph's queries (LLMConfig.prefill_chunk)
CHUNK_STARTS = (0, 4_096, 12_043, 30_000)  # 12,043: the 45-minute prompt's last chunk


def place(kv: paged_kv.PagedKV, positions: list[int]) -> torch.Tensor:
    lengths = [n for p in positions for n in (p, min(300, p), p)]
    free = torch.randperm(kv.pages - 1).add(1).tolist()
    updates = [(row, i, free.pop()) for row, n in enumerate(lengths) for i in range(n // kv.page_size + 1)]
    kv.set_pages(updates)
    return torch.tensor(lengths, device="cuda")


def flex_block_mask(kv: paged_kv.PagedKV, rows: int, positions: torch.Tensor) -> BlockMask:
    """Every page a row holds as a partial block, in logical order: all but the last visible whole, the last up
    to the row's position. (With full blocks listed apart, FlexAttention's decoding kernel splits the work by
    the pool's length instead of each row's.)"""
    ps = kv.page_size
    lengths = positions.to(torch.int32) + 1
    held = (lengths + ps - 1) // ps
    table = kv.page_table[:rows]
    last = table.gather(1, (held - 1).long()[:, None])[:, 0]
    tail = (lengths - 1) % ps

    def visible(b, h, q_idx, kv_idx):
        return (kv_idx // ps != last[b]) | (kv_idx % ps <= tail[b])

    return BlockMask.from_kv_blocks(
        kv_num_blocks=held.view(rows, 1, 1),
        kv_indices=table.view(rows, 1, 1, -1),
        BLOCK_SIZE=ps,
        mask_mod=visible,
        seq_lengths=(1, kv.pages * ps),
        compute_q_blocks=False,
    )


def setup(positions: list[int]):
    """A pool with the case's rows placed, a query per row, and the chosen kernel's output to compare with."""
    rows = 3 * len(positions)
    kv = paged_kv.PagedKV(1, KV_HEADS, HEAD_DIM, POOL_PAGES, rows, 65_536, "cuda", torch.bfloat16)
    kv.k[0].normal_()
    kv.v[0].normal_()
    positions_t = place(kv, positions)
    lengths = (positions_t + 1).to(torch.int32)
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    held_bytes = int(lengths.sum()) * KV_HEADS * HEAD_DIM * 2 * 2
    scale = HEAD_DIM**-0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = paged_attention.splits_for(rows, KV_HEADS, kv.max_len, sms)
    reference = paged_attention.paged_decode(q, kv.k[0], kv.v[0], kv.page_table, lengths, scale, kv.page_size)
    return rows, kv, positions_t, lengths, q, held_bytes, scale, chosen, reference


def timed(name: str, kernel: str, fn, held_bytes: int, reference: torch.Tensor | None) -> dict:
    try:
        out = fn()
        ms = common.gpu_ms(fn)
        row = {"case": name, "kernel": kernel, "ms": ms, "tb_per_s": held_bytes / ms / 1e9}
        if reference is not None:
            row["max_diff_vs_paged_decode"] = float((out.float() - reference.float()).abs().max())
    except Exception as e:  # an option this torch does not take
        row = {"case": name, "kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(row, flush=True)
    return row


@torch.inference_mode()
def run_case(name: str, positions: list[int]) -> list[dict]:
    rows, kv, positions_t, lengths, q, held_bytes, scale, chosen, reference = setup(positions)
    out_rows = []
    for splits in SPLITS:
        label = f"paged_decode splits={splits or chosen}" + (" (chosen)" if splits is None else "")

        def call(splits=splits):
            k, v = kv.k[0], kv.v[0]
            return paged_attention.paged_decode(q, k, v, kv.page_table, lengths, scale, kv.page_size, splits)

        out_rows.append(timed(name, label, call, held_bytes, reference))
    mask = flex_block_mask(kv, rows, positions_t)
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    out_rows.append(
        timed(
            name,
            "FlexAttention",
            lambda: flex(q, kv.k[0], kv.v[0], block_mask=mask, scale=scale, enable_gqa=True),
            held_bytes,
            reference,
        )
    )
    keys = int(positions_t.max()) + 1
    kv_rows = torch.arange(rows, device="cuda")

    def gathered():
        index = kv.gather_index(kv_rows, keys)
        visible = paged_kv.causal_visibility(keys, positions_t[:, None])
        return paged_kv.gathered(q, kv.k[0], kv.v[0], index, visible, scale)

    out_rows.append(timed(name, "gather + SDPA", gathered, held_bytes, reference))
    return out_rows


def graph_ms(fn, calls: int = 10, replays: int = 20) -> float:
    """GPU time of one call of `fn` replayed from a CUDA graph of `calls` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return common.replay_ms(graph, replays) / calls


@torch.inference_mode()
def tiles_case(name: str, positions: list[int]) -> list[dict]:
    _, kv, _, lengths, q, held_bytes, scale, chosen, reference = setup(positions)
    out_rows = []
    split_counts = sorted({max(1, chosen // 4), chosen, chosen * 4})
    for block, warps, stages in itertools.product((64, 128), (4, 8), (1, 2, 3)):
        tiles = paged_attention.DecodeTiles(block, warps, stages)
        for splits in split_counts:

            def call(splits=splits, tiles=tiles):
                k, v = kv.k[0], kv.v[0]
                return paged_attention.paged_decode(q, k, v, kv.page_table, lengths, scale, kv.page_size, splits, tiles)

            try:
                diff = float((call().float() - reference.float()).abs().max())
                ms = graph_ms(call)
                row = {"case": name, "block": block, "warps": warps, "stages": stages, "splits": splits}
                row |= {"ms": ms, "tb_per_s": held_bytes / ms / 1e9, "max_diff": diff, "chosen": splits == chosen}
            except Exception as e:  # a shape that does not fit the GPU's shared memory
                row = {"case": name, "block": block, "warps": warps, "stages": stages, "splits": splits}
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            out_rows.append(row)
    done = sorted((r for r in out_rows if "ms" in r), key=lambda r: r["ms"])
    tiles = paged_attention.DecodeTiles()
    default = [r for r in done if (r["block"], r["warps"], r["stages"]) == (tiles.block, tiles.warps, tiles.stages)]
    default = [r for r in default if r["chosen"]]
    print(name, "default:", default[:1], flush=True)
    for r in done[:8]:
        print(name, r, flush=True)
    return out_rows


@torch.inference_mode()
def prefill_case(start: int) -> list[dict]:
    """One chunk of CHUNK queries at `start` over row 0's pages: the prefill kernel by launch shape, against
    flash attention over the gathered keys."""
    name = f"chunk of {CHUNK} at {start}"
    kv = paged_kv.PagedKV(1, KV_HEADS, HEAD_DIM, POOL_PAGES, 1, 65_536, "cuda", torch.bfloat16)
    kv.k[0].normal_()
    kv.v[0].normal_()
    keys = start + CHUNK
    free = torch.randperm(kv.pages - 1).add(1).tolist()
    kv.set_pages([(0, i, free.pop()) for i in range(-(-keys // kv.page_size))])
    q = torch.randn(1, HEADS, CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(start, keys, device="cuda")
    table, scale = kv.page_table[0], HEAD_DIM**-0.5
    rows = torch.zeros(1, dtype=torch.long, device="cuda")

    def flash():
        return paged_kv.prompt_chunk(q, kv.k[0], kv.v[0], kv.gather_index(rows, keys), scale)

    reference = flash()
    try:
        flash_ms = graph_ms(flash)
    except RuntimeError:  # not capturable with this torch: launched, with its launch cost
        flash_ms = common.gpu_ms(flash)
    out_rows = [{"case": name, "kernel": "gather + SDPA flash", "ms": flash_ms}]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for rows_, block, warps, splits in itertools.product((64, 128), (64, 128), (4, 8), (1, 2, 4, 8, 16, None)):
        tiles = paged_attention.PrefillTiles(rows_, block, warps, splits)
        row = {"case": name, "rows": rows_, "block": block, "warps": warps, "splits": splits}

        def call(tiles=tiles):
            return paged_attention.paged_prefill(q, kv.k[0], kv.v[0], table, positions, scale, kv.page_size, tiles)

        try:
            row["max_diff"] = float((call().float() - reference.float()).abs().max())
            row["ms"] = graph_ms(call)
        except Exception as e:  # a shape that does not fit the GPU's shared memory
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        out_rows.append(row)
    default = paged_attention.PrefillTiles()
    group_pad = 1 << (HEADS // KV_HEADS - 1).bit_length()  # the kernel's tile of a KV head's query heads
    chosen = paged_attention.prefill_splits_for(-(-CHUNK // (default.rows // group_pad)) * KV_HEADS, sms)
    for row in out_rows[1:]:
        row["default"] = (row["rows"], row["block"], row["warps"]) == (default.rows, default.block, default.warps)
        row["default"] = row["default"] and row["splits"] is None
        row["chosen_splits"] = chosen
    done = sorted((r for r in out_rows[1:] if "ms" in r), key=lambda r: r["ms"])
    print(name, "flash:", round(out_rows[0]["ms"], 4), "ms", flush=True)
    print(name, "default:", [r for r in done if r["default"]], flush=True)
    for r in done[:6]:
        print(name, r, flush=True)
    return out_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", action="store_true", help="sweep the kernel's launch shapes in CUDA graphs")
    p.add_argument("--prefill", action="store_true", help="the prefill kernel's launch shapes on a prompt chunk")
    args = p.parse_args()
    results = {"rows": []}
    if args.prefill:
        for start in CHUNK_STARTS:
            results["rows"] += prefill_case(start)
            torch.cuda.empty_cache()
        common.save("attention-prefill", results)
        return
    for name, positions in CASES.items():
        results["rows"] += (tiles_case if args.tiles else run_case)(name, positions)
        torch.cuda.empty_cache()
    common.save("attention-tiles" if args.tiles else "attention", results)


if __name__ == "__main__":
    main()

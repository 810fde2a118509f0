"""One layer's decode attention over the paged pool, by kernel and kernel option (no model needed).

    python bench/attention_bench.py

The pool has the size the llm plans on an H200 for the 1.5B shape; rows are placed as in paged_bench's
cases (positive and unconditional branches at the stream's position, the negative one at a segment's).
Prints ms per call and the bandwidth it reaches over the keys and values the rows really hold.
"""

from __future__ import annotations

import common
import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from services.llm import paged_kv

POOL_PAGES, HEADS, KV_HEADS, HEAD_DIM = 33_422, 12, 2, 128
CASES = {
    "b1@30K": [30_000],
    "b64@2K-30K": np.linspace(2_000, 30_000, 64).astype(int).tolist(),
    "b256@2K-6K": np.linspace(2_000, 6_000, 256).astype(int).tolist(),
}
OPTIONS = {
    "flex": None,
    "flex split 256": {"SPLIT_KV": 256},
    "flex split 512": {"SPLIT_KV": 512},
    "flex main kernel": {"FORCE_USE_FLEX_ATTENTION": True},
}


def place(kv: paged_kv.PagedKV, positions: list[int]) -> torch.Tensor:
    lengths = [n for p in positions for n in (p, min(300, p), p)]
    free = torch.randperm(kv.pages - 1).add(1).tolist()
    updates = [(row, i, free.pop()) for row, n in enumerate(lengths) for i in range(n // kv.page_size + 1)]
    kv.set_pages(updates)
    return torch.tensor(lengths, device="cuda")


@torch.inference_mode()
def run_case(name: str, positions: list[int]) -> list[dict]:
    rows = 3 * len(positions)
    kv = paged_kv.PagedKV(1, KV_HEADS, HEAD_DIM, POOL_PAGES, rows, 65_536, "cuda", torch.bfloat16)
    kv.k[0].normal_()
    kv.v[0].normal_()
    lengths = place(kv, positions)
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    held_bytes = int(lengths.sum()) * KV_HEADS * HEAD_DIM * 2 * 2
    mask = paged_kv.decode_block_mask(kv, rows, lengths)
    out_rows, reference = [], None
    for option, kernel_options in OPTIONS.items():
        flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)

        def call(flex=flex, kernel_options=kernel_options):
            return flex(q, kv.k[0], kv.v[0], block_mask=mask, enable_gqa=True, kernel_options=kernel_options)

        try:
            out = call()
            reference = out if reference is None else reference
            ms = common.gpu_ms(call)
            row = {"case": name, "kernel": option, "ms": ms, "tb_per_s": held_bytes / ms / 1e9}
            row["max_diff_vs_flex"] = float((out - reference).abs().max())
        except Exception as e:  # an option this torch does not take
            row = {"case": name, "kernel": option, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        out_rows.append(row)
        print(row, flush=True)
    keys = int(lengths.max()) + 1
    kv_rows = torch.arange(rows, device="cuda")

    def gathered():
        index = kv.gather_index(kv_rows, keys)
        visible = paged_kv.causal_visibility(keys, lengths[:, None])
        return paged_kv.gathered(q, kv.k[0], kv.v[0], index, visible, None)

    ms = common.gpu_ms(gathered, 5)
    row = {"case": name, "kernel": "gather + SDPA", "ms": ms, "tb_per_s": held_bytes / ms / 1e9}
    row["max_diff_vs_flex"] = float((gathered() - reference).abs().max())
    out_rows.append(row)
    print(row, flush=True)
    return out_rows


def main() -> None:
    results = {"rows": []}
    for name, positions in CASES.items():
        results["rows"] += run_case(name, positions)
        torch.cuda.empty_cache()
    common.save("attention", results)

"""A Triton matmul for a few rows (a program per strip of the weight, read once) against cuBLAS, at the models'
weight shapes: whether a decode step at batch 1 has matmul time to win from a kernel of its own.

    python bench/skinny_linear.py                      # 1.5B and 7B shapes, 2, 3 and 6 rows, the launch rule
    python bench/skinny_linear.py --sweep              # also every launch shape of a small grid

For each weight shape a captured CUDA graph multiplies the rows by `copies` distinct weights (a step reads
every layer's own weight once, so the L2 cache holds none of them), once with `F.linear` (cuBLAS) and once with
the kernel; it prints µs per matmul, the weight bytes read per second, and the ratio against cuBLAS measured in
the same run, beside the GPU's device-to-device copy bandwidth. Writes `skinny-linear.json`.
"""

from __future__ import annotations

import argparse
import dataclasses

import common
import torch
import torch.nn.functional as F

from services.common.tiny_model import tiny_config

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton
    triton = None


@dataclasses.dataclass(frozen=True)
class SkinnyTiles:
    """A launch shape: output columns per program, inputs per inner step, programs sharing a column's inputs."""

    block_n: int = 8
    block_k: int = 512
    splits: int = 1
    warps: int = 4


def tiles_for(n: int, k: int) -> SkinnyTiles:
    """The launch shape for an (n, k) weight: enough programs to keep every SM's loads in flight (~2 per SM
    on a 132-SM H100 at the least), each reading whole 1 KiB runs of a weight row."""
    programs = -(-n // 8)
    splits = 1
    while programs * splits < 256 and k // (splits * 2) >= 1024:
        splits *= 2
    return SkinnyTiles(block_n=8, block_k=512, splits=splits)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiles: SkinnyTiles) -> torch.Tensor:
    """x (..., k) @ weight (n, k)^T + bias (n,) with the kernel, `tiles` as given. Rows: 8 at most."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    block_m = max(2, 1 << (m - 1).bit_length())
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, tiles.block_n), tiles.splits)
    has_bias = bias is not None
    if tiles.splits == 1:
        _skinny_kernel[grid](
            x2, weight, bias if has_bias else weight, out, out, m, n, k, x2.stride(0), weight.stride(0),
            out.stride(0), HAS_BIAS=has_bias, PARTIAL=False, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k, SPLITS=1, num_warps=tiles.warps,
        )  # fmt: skip
    else:
        partial = torch.empty((tiles.splits, m, n), device=x.device, dtype=torch.float32)
        _skinny_kernel[grid](
            x2, weight, weight, out, partial, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=False, PARTIAL=True, BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            SPLITS=tiles.splits, num_warps=tiles.warps,
        )  # fmt: skip
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](
            partial, bias if has_bias else partial, out, m * n, n, HAS_BIAS=has_bias, SPLITS=tiles.splits, BLOCK=1024
        )
    return out.reshape(*lead, n)


if triton is not None:

    @triton.jit
    def _skinny_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLITS,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # this program's share of the inputs: whole BLOCK_K steps
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS) * BLOCK_K
        start = split * per_split
        end = tl.minimum(start + per_split, K)
        # products kept per input lane and summed once at the end: no reduction inside the loop
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            kk = k0 + ks
            w = tl.load(
                w_ptr + cols[:, None] * stride_wn + kk[None, :],
                mask=(cols[:, None] < N) & (kk[None, :] < end),
                other=0.0,
                eviction_policy="evict_first",  # read once: keep L2 for the activations
            )
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < end))
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        total = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
        keep = (rows[:, None] < M) & (cols[None, :] < N)
        if PARTIAL:
            tl.store(part_ptr + (split * M + rows[:, None]) * N + cols[None, :], total, mask=keep)
        else:
            if HAS_BIAS:
                total += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], total.to(y_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _sum_splits_kernel(
        part_ptr, b_ptr, y_ptr, MN, N, HAS_BIAS: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr
    ):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = i < MN
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):  # a fixed order: the same sum every run
            total += tl.load(part_ptr + s * MN + i, mask=keep, other=0.0)
        if HAS_BIAS:
            total += tl.load(b_ptr + i % N, mask=keep, other=0.0).to(tl.float32)
        tl.store(y_ptr + i, total.to(y_ptr.dtype.element_ty), mask=keep)


def weight_shapes(shape: str) -> list[tuple[str, int, int, bool]]:
    """(name, outputs, inputs, bias) of the weights a decode step multiplies a few rows by, from the config."""
    config = tiny_config(shape)
    text, head = config.text_config, config.diffusion_head_config
    heads = text.num_attention_heads * text.head_dim
    return [
        ("lm qkv", heads + 2 * text.num_key_value_heads * text.head_dim, text.hidden_size, True),
        ("lm o", text.hidden_size, heads, False),
        ("lm gate_up", 2 * text.intermediate_size, text.hidden_size, False),
        ("lm down", text.hidden_size, text.intermediate_size, False),
        ("head gate_up", 2 * head.intermediate_size, head.hidden_size, False),
        ("head down", head.hidden_size, head.intermediate_size, False),
    ]


SWEEP = [
    SkinnyTiles(block_n=bn, block_k=bk, splits=s, warps=4)
    for bn in (4, 8, 16)
    for bk in (128, 256, 512)
    for s in (1, 2, 4)
    if bn * bk <= 4096
] + [SkinnyTiles(block_n=16, block_k=256, splits=s, warps=8) for s in (1, 2, 4)]


def timed_us(fn, copies: int) -> float:
    """µs per matmul: `fn(i)` for each of `copies` weights, captured in one graph and replayed."""
    for i in range(copies):  # compile and warm up outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return common.replay_ms(graph) * 1000 / copies


def measure(shape: str, name: str, n: int, k: int, has_bias: bool, rows: list[int], sweep: bool, budget: float):
    """One weight shape at each row count: cuBLAS, the launch rule, and (with `sweep`) the grid's best."""
    size = n * k * 2
    copies = max(2, min(64, int(budget // size)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
    out = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cublas = timed_us(lambda i, x=x: F.linear(x, weights[i], bias), copies)
        rule = tiles_for(n, k)
        timings = {}
        for tiles in [rule] + ([t for t in SWEEP if t != rule] if sweep else []):
            try:
                timings[tiles] = timed_us(lambda i, x=x, t=tiles: skinny_linear(x, weights[i], bias, t), copies)
            except Exception as e:  # a launch shape the GPU cannot run (registers, shared memory)
                print(f"  {tiles}: {type(e).__name__}", flush=True)
        want = F.linear(x.float(), weights[0].float(), None if bias is None else bias.float())
        got = skinny_linear(x, weights[0], bias, rule).float()
        error = ((got - want).abs().max() / want.abs().max()).item()
        best = min(timings, key=timings.get)
        row = {
            "shape": shape,
            "weight": name,
            "n": n,
            "k": k,
            "rows": m,
            "copies": copies,
            "cublas_us": cublas,
            "cublas_tb_per_s": size / cublas / 1e6,
            "rule": vars(rule) | {"us": timings[rule], "tb_per_s": size / timings[rule] / 1e6},
            "best": vars(best) | {"us": timings[best], "tb_per_s": size / timings[best] / 1e6},
            "rule_vs_cublas": cublas / timings[rule],
            "max_error_vs_fp32": error,
        }
        out.append(row)
        print(
            f"{shape} {name:13s} ({n}x{k}) rows {m}: cuBLAS {cublas:6.1f} us ({row['cublas_tb_per_s']:.2f} TB/s)"
            f" | rule {timings[rule]:6.1f} us ({row['rule']['tb_per_s']:.2f} TB/s, {row['rule_vs_cublas']:.2f}x)"
            f" | best {timings[best]:6.1f} us {best} | err {error:.1e}",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1.5b,7b")
    parser.add_argument("--rows", default="2,3,6")
    parser.add_argument("--sweep", action="store_true", help="also time every launch shape of a small grid")
    parser.add_argument("--weight-bytes", type=float, default=1.5e9, help="distinct weights per graph, in bytes")
    args = parser.parse_args()
    bandwidth = common.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for shape in args.shapes.split(","):
        for name, n, k, has_bias in weight_shapes(shape):
            results += measure(shape, name, n, k, has_bias, rows, args.sweep, args.weight_bytes)
            torch.cuda.empty_cache()
    common.save("skinny-linear", {"copy_bandwidth_tb_per_s": bandwidth / 1e12, "rows": results})


if __name__ == "__main__":
    main()

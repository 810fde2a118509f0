"""Where the acoustic step's GPU time goes, by part and batch: diffusion (10 steps with CFG), σ-VAE decode of one
frame, semantic encode of that frame, and the whole captured step.

    python bench/acoustic_parts.py --shape 1.5b --batches 1,64,256
    python bench/acoustic_parts.py --shape 1.5b --batches 1,256 --variants ,t2048w2,t1024w1,unfused

Each part runs the engine's own compiled code for `n` streams, captured in a CUDA graph and replayed, as the
acoustic step runs it. For each part it prints the GPU time, the kernels one replay launches (from a profile of
the replays), and two floors on the same GPU: its weights read once (diffusion: once per diffusion step) at the
GPU's copy bandwidth measured in the same run, and its kernels at the shortest kernel time the profile saw.
The σ-VAE decode and semantic encode also run with the fused block kernel at more stages ("_upto256"), with
smaller tiles on fewer warps ("_t2048w2", "_t1024w1": samples x channels a program holds, and its warps), and with
every ConvNeXt block as compiled PyTorch ("_unfused"), with the largest difference between the engine's decode and
the unfused one.
"""

from __future__ import annotations

import argparse
import functools
import time

import common
import torch
from paged_bench import user_defaults

from services.acoustic import convnext_kernel
from services.acoustic.engine import GRAPH_DIFFUSION_STEPS, AcousticEngine
from services.acoustic.streaming import streaming_forward
from services.common.checkpoint import resolve_checkpoint
from services.common.model_args import resolve_dtype
from services.render.values import RenderStep, StreamSpec


def kernels_of(graph: torch.cuda.CUDAGraph, replays: int = 3) -> tuple[int, float, float]:
    """Kernels one replay runs, their summed GPU time (ms) and the shortest one (ms)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    times = [e.device_time for e in kernels] or [0.0]
    return len(kernels) // replays, sum(times) / replays / 1000, min(times) / 1000


def capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, picks kernels
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


SMALL, SMALLER = convnext_kernel.BlockTiles(2048, 2), convnext_kernel.BlockTiles(1024, 1)
# The conv stacks' variants: name suffix -> (the widest stage the fused kernel takes, its tiles; None: the default)
VARIANTS = {
    "": (convnext_kernel.MAX_CHANNELS, None),
    "_t2048w2": (convnext_kernel.MAX_CHANNELS, SMALL),
    "_t1024w1": (convnext_kernel.MAX_CHANNELS, SMALLER),
    "_upto256": (256, None),
    "_upto256_t2048w2": (256, SMALL),
    "_upto256_t1024w1": (256, SMALLER),
    "_unfused": (0, None),
}


def stack(model, x, cache, block_step, limit: int, tiles: convnext_kernel.BlockTiles | None = None) -> torch.Tensor:
    """`streaming_forward` with the fused block kernel at stages of at most `limit` channels, launched with `tiles`
    (default: the kernel's own)."""
    default = convnext_kernel.MAX_CHANNELS, convnext_kernel.TILES
    convnext_kernel.MAX_CHANNELS, convnext_kernel.TILES = limit, tiles or default[1]
    try:
        return streaming_forward(model, x, cache, block_step)
    finally:
        convnext_kernel.MAX_CHANNELS, convnext_kernel.TILES = default


def decoder_cache_tensors(cache) -> list[torch.Tensor]:
    return [layer.cache for layer in cache.layers.values()]


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.inference_mode()
def parts(acoustic, n: int, bandwidth: float, variants: dict) -> dict:
    ac = acoustic
    hidden = ac.hidden_size
    condition = torch.randn(2 * n, hidden, device="cuda", dtype=ac.dtype)
    noise = torch.randn(n, ac.latent_size, device="cuda", dtype=ac.dtype)
    cfg = torch.full((n, 1), 1.3, device="cuda", dtype=ac.dtype)
    plan = ac._plan(GRAPH_DIFFUSION_STEPS)
    latent = torch.randn(n, ac.latent_size, 1, device="cuda", dtype=ac.dtype)
    audio = torch.randn(n, 1, 3200, device="cuda", dtype=ac.dtype)
    decoder_cache, semantic_cache = ac.decoder_state.leading(n), ac.semantic_state.leading(n)
    pieces = {
        "diffusion": (
            lambda: ac._compiled_diffusion(condition, noise, cfg, plan),
            weight_bytes(ac.diffusion_head) * GRAPH_DIFFUSION_STEPS,
        ),
    }
    # The conv stacks again with the fused kernel at more stages (up to 256 channels), with smaller tiles on fewer
    # warps (a sample's channels, which each norm sums over, in fewer warps), and at no stage: every block as
    # compiled PyTorch, as before the kernel. The engine's block step reads the limit and the tiles when it is
    # called, so each variant's capture takes its own.
    for suffix, (limit, tiles) in variants.items():
        for name, model, x, cache in (
            ("sigma_vae_decode", ac.audio_tower.decoder, latent, decoder_cache),
            ("semantic_encode", ac.semantic_encoder, audio, semantic_cache),
        ):
            pieces[name + suffix] = (
                functools.partial(stack, model, x, cache, ac._compiled_block, limit, tiles),
                weight_bytes(model),
            )
    # The unfused decode's output against the engine's, from the same state
    saved = [t.clone() for t in decoder_cache_tensors(decoder_cache)]
    plain = stack(ac.audio_tower.decoder, latent, decoder_cache, ac._compiled_block, convnext_kernel.MAX_CHANNELS)
    for t, s in zip(decoder_cache_tensors(decoder_cache), saved, strict=True):
        t.copy_(s)
    via_unfused = stack(ac.audio_tower.decoder, latent, decoder_cache, ac._compiled_block, 0)
    out = {
        "streams": n,
        "unfused_max_diff": float((plain.float() - via_unfused.float()).abs().max()),
        "audio_max": float(via_unfused.float().abs().max()),
    }
    for name, (fn, nbytes) in pieces.items():
        graph = capture(fn)
        count, summed, shortest = kernels_of(graph)
        out[name] = {
            "ms": common.replay_ms(graph),
            "kernels": count,
            "kernel_ms_summed": summed,
            "weights_read_floor_ms": nbytes / bandwidth * 1000,
            "kernel_count_floor_ms": count * shortest,
        }
    bucket = min(b for b in ac.graphs if b >= n)
    whole = ac.graphs[bucket]
    out["whole_step"] = {"bucket": bucket, "ms": common.replay_ms(whole.graph)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument(
        "--variants",
        default=",".join(v.lstrip("_") for v in VARIANTS),
        help="the conv stacks' variants to time, by suffix without its '_' (empty: the engine's own), e.g. ',unfused'",
    )
    args = p.parse_args()
    chosen = [("_" + v if v else "") for v in args.variants.split(",")]
    if unknown := [v for v in chosen if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {[v.lstrip('_') for v in VARIANTS]}")
    variants = {v: VARIANTS[v] for v in chosen}
    batches = [int(b) for b in args.batches.split(",")]
    defaults = user_defaults()
    path = common.checkpoint(args.shape)
    ckpt = resolve_checkpoint(str(path))
    t = time.perf_counter()
    graphs, compiled = not defaults.no_cuda_graphs, not defaults.no_compile
    dtype = resolve_dtype(defaults)
    acoustic = AcousticEngine(ckpt, defaults.device, dtype, max(batches), graphs, compiled)
    print(f"built in {time.perf_counter() - t:.0f} s", flush=True)
    acoustic.step(RenderStep(starts=[StreamSpec(i, i, 1.3, GRAPH_DIFFUSION_STEPS) for i in range(max(batches))]))
    bandwidth = common.copy_bandwidth()
    results = {
        "configuration": {"compiled": not defaults.no_compile, "dtype": str(acoustic.dtype)},
        "copy_bandwidth_tb_per_s": bandwidth / 1e12,
        "rows": [],
    }
    for n in batches:
        row = parts(acoustic, n, bandwidth, variants)
        print(row, flush=True)
        results["rows"].append(row)
    common.save(f"acoustic-parts-{args.shape}", results)


if __name__ == "__main__":
    main()

"""The reference generate() against the engine, in one process on one GPU (random weights, fixed_frames).

    python bench/engine_bench.py --shape 1.5b --ref-batches 1,8 --batches 1,8,32,64
    python bench/engine_bench.py --shape tiny --check      # graphs == eager, and closeness to the reference

Prints ms per step, frames/s, real-time factor, peak GPU memory and the speed-up over the reference measured
in this same run, and writes JSON under bench/results/ (or $OUT).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import common
import numpy as np
import torch

from services.acoustic.engine import AcousticEngine
from services.common.audio import FRAME_MS
from services.common.checkpoint import resolve_checkpoint
from services.common.reference import load_reference
from services.llm.engine import LMEngine, LMStream
from services.render.values import RenderStep, StreamSpec


def reference_run(model, ids: list[int], batch: int, frames: int) -> dict:
    go = common.forced_reference(model, ids, batch)
    go(3)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    audio = go(frames)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    assert audio[0].shape[-1] == frames * 3200
    return summarize("reference", batch, frames, elapsed)


def summarize(name: str, batch: int, frames: int, elapsed: float) -> dict:
    ms = elapsed / frames * 1000
    return {
        "system": name,
        "batch": batch,
        "frames": frames,
        "ms_per_step": ms,
        "frames_per_s": batch * frames / elapsed,
        "real_time_factor": ms / FRAME_MS,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def engine_run(
    lm: LMEngine,
    acoustic: AcousticEngine,
    ids: list[int],
    batch: int,
    frames: int,
    seed0: int = 0,
    keep_audio: bool = False,
    name: str = "engine",
):
    streams = [LMStream(ids, None, fixed_frames=frames, max_frames=frames) for _ in range(batch)]
    specs = [StreamSpec(1000 + i, seed0 + i, 1.3, 10) for i in range(batch)]
    for s in streams:
        assert lm.admit(s)
    while lm.decoding_count < batch:
        lm.prefill(4096)
    acoustic.step(RenderStep(starts=specs))
    ids_ = [s.stream_id for s in specs]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = []
    t = time.perf_counter()
    while True:
        decisions, positive, negative = lm.decode()
        if not decisions[0].speech:
            break
        embeds, audio = acoustic.render(ids_, positive, negative)
        lm.accept(decisions, embeds)
        chunk = audio.float().cpu()  # every frame leaves the GPU for its client
        if keep_audio:
            out.append(chunk)
    elapsed = time.perf_counter() - t
    for s in streams:
        lm.release(s)
    for s in ids_:
        acoustic.end(s)
    result = summarize(name, batch, frames, elapsed)
    return (result, torch.cat(out, dim=1).numpy()) if keep_audio else result


def allocation_sites(snapshot: dict, top: int = 12) -> dict[str, float]:
    """Live GPU memory by where it was allocated: the innermost frame of this project and of the library."""
    sizes: dict[str, float] = {}
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = block.get("frames") or []
            ours = next((f for f in frames if "/services/" in f["filename"] or "/bench/" in f["filename"]), None)
            inner = frames[0] if frames else None
            key = " <- ".join(
                f"{Path(f['filename']).name}:{f['line']}({f['name']})" for f in (inner, ours) if f is not None
            )
            sizes[key or "unknown"] = sizes.get(key or "unknown", 0.0) + block["size"] / 2**20
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:top])


def build_engines(ckpt, streams: int, context: int, graphs: bool = True, torch_compile: bool = False):
    t = time.perf_counter()
    acoustic = AcousticEngine(
        ckpt, "cuda", torch.bfloat16, max_streams=streams, cuda_graphs=graphs, torch_compile=torch_compile
    )
    lm = LMEngine(
        ckpt,
        "cuda",
        torch.bfloat16,
        max_streams=streams,
        max_context=context,
        cuda_graphs=graphs,
        torch_compile=torch_compile,
    )
    print(f"engines for {streams} streams in {time.perf_counter() - t:.0f} s (compile={torch_compile})", flush=True)
    return lm, acoustic


def check(ckpt, ids) -> dict:
    """CUDA graphs (with and without torch.compile) against eager on the same streams, and the engine against
    the reference at batch 1."""
    context = len(ids) + 64
    lm, ac = build_engines(ckpt, 4, context, graphs=True)
    _, graphed = engine_run(lm, ac, ids, 3, 20, keep_audio=True)
    del lm, ac
    lm, ac = build_engines(ckpt, 4, context, graphs=True, torch_compile=True)
    _, compiled = engine_run(lm, ac, ids, 3, 20, keep_audio=True)
    del lm, ac
    lm, ac = build_engines(ckpt, 4, context, graphs=False)
    _, eager = engine_run(lm, ac, ids, 3, 20, keep_audio=True)
    _, alone = engine_run(lm, ac, ids, 1, 20, seed0=1, keep_audio=True)  # stream 1 of the batch, alone
    del lm, ac
    ref = load_reference(ckpt.path, dtype=torch.bfloat16, device="cuda")
    from services.common.reference import reference_audio

    expected = reference_audio(ref, ids, [], 1, 20)
    peak = np.abs(expected).max()
    result = {
        "graphs_vs_eager_max_diff": float(np.abs(graphed - eager).max()),
        "compiled_graphs_vs_eager_max_diff": float(np.abs(compiled - eager).max()),
        "eager_peak": float(np.abs(eager).max()),
        "alone_vs_batch_max_diff": float(np.abs(alone[0] - eager[1]).max()),
        "engine_vs_reference_max_diff_of_peak": float(np.abs(alone[0] - expected).max() / peak),
        "engine_vs_reference_correlation": float(np.corrcoef(alone[0], expected)[0, 1]),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--ref-batches", default="1,8")
    p.add_argument("--frames", type=int, default=common.FRAMES)
    p.add_argument("--variants", default="graphs,compiled", help="graphs: eager kernels captured; compiled: compiled")
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    path = common.checkpoint(args.shape)
    ckpt = resolve_checkpoint(str(path))
    ids = common.prompt_ids(path)
    results: dict = {"shape": args.shape, "prompt_tokens": len(ids), "rows": []}
    if args.check:
        results["check"] = check(ckpt, ids)
        common.save(f"check-{args.shape}", results)
        return

    ref = load_reference(path, dtype=torch.bfloat16, device="cuda")
    for b in [int(x) for x in args.ref_batches.split(",") if x]:
        results["rows"].append(reference_run(ref, ids, b, args.frames))
        print(results["rows"][-1], flush=True)
    del ref
    gc.collect()
    torch.cuda.empty_cache()

    batches = [int(x) for x in args.batches.split(",")]
    variants = args.variants.split(",")
    for variant in variants:
        lm, ac = build_engines(ckpt, max(batches), len(ids) + args.frames + 8, torch_compile=variant == "compiled")
        name = "engine+compile" if variant == "compiled" else "engine"
        for b in batches:
            results["rows"].append(engine_run(lm, ac, ids, b, args.frames, name=name))
            print(results["rows"][-1], flush=True)
        del lm, ac
        gc.collect()
        torch.cuda.empty_cache()
    compile_ = "compiled" in variants

    # Peak memory at batch 1 against what one stream needs: the weights plus its own KV and conv state.
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python")
    lm, ac = build_engines(ckpt, 1, len(ids) + args.frames + 8, torch_compile=compile_)
    weights = sum(
        p.numel() * p.element_size()
        for m in (
            lm.lm,
            ac.audio_tower,
            ac.semantic_encoder,
            ac.diffusion_head,
            ac.acoustic_connector,
            ac.semantic_connector,
        )
        for p in m.parameters()
    )
    weights += lm.head_rows.numel() * lm.head_rows.element_size()
    kv = sum(t.numel() * t.element_size() for t in (*lm.kv.k, *lm.kv.v))
    conv = ac.decoder_state.bytes_per_row() + ac.semantic_state.bytes_per_row()
    torch.cuda.reset_peak_memory_stats()
    one = engine_run(lm, ac, ids, 1, args.frames)
    peak = torch.cuda.max_memory_allocated()
    sites = allocation_sites(torch.cuda.memory._snapshot())
    torch.cuda.memory._record_memory_history(enabled=None)
    results["memory_batch1"] = {
        "weights_gib": weights / 2**30,
        "kv_gib": kv / 2**30,
        "conv_state_gib": conv / 2**30,
        "peak_gib": peak / 2**30,
        "peak_over_weights_plus_kv": peak / (weights + kv + conv),
        "largest_allocation_sites_mib": sites,
    }
    ref_rows = {r["batch"]: r for r in results["rows"] if r["system"] == "reference"}
    for r in results["rows"]:
        if r["system"].startswith("engine") and 1 in ref_rows:
            r["speedup_vs_reference_b1_latency"] = ref_rows[1]["ms_per_step"] / r["ms_per_step"]
        if r["system"].startswith("engine") and ref_rows:
            best = max(ref_rows.values(), key=lambda x: x["frames_per_s"])
            r["throughput_vs_reference_best"] = r["frames_per_s"] / best["frames_per_s"]
    results["one_stream_check"] = one
    common.save(f"engine-{args.shape}", results)


if __name__ == "__main__":
    main()

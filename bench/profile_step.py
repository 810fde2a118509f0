"""Where one engine step's time goes: LM graph, acoustic graph, and the host work between them.

python bench/profile_step.py --shape 1.5b --batch 1
"""

from __future__ import annotations

import argparse
import time

import common
import torch
from engine_bench import build_engines

from services.common.checkpoint import resolve_checkpoint
from services.llm.engine import LMStream
from services.render.values import RenderStep, StreamSpec


def timed(fn, n: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the captured steps")
    p.add_argument("--no-cudnn", action="store_true", help="native convolutions instead of cuDNN's")
    args = p.parse_args()
    torch.backends.cudnn.enabled = not args.no_cudnn
    path = common.checkpoint(args.shape)
    ckpt = resolve_checkpoint(str(path))
    ids = common.prompt_ids(path)
    lm, ac = build_engines(ckpt, max(args.batch, 1), len(ids) + 400, torch_compile=args.compile)
    allocated_after_build = torch.cuda.memory_allocated()
    b = args.batch
    streams = [LMStream(ids, None, fixed_frames=300, max_frames=300) for _ in range(b)]
    specs = [StreamSpec(i, i, 1.3, 10) for i in range(b)]
    for s in streams:
        lm.admit(s)
    while lm.decoding_count < b:
        lm.prefill(4096)
    ac.step(RenderStep(starts=specs))
    sids = [s.stream_id for s in specs]
    decisions, pos, neg = lm.decode()
    out = {}
    lm_graph = lm.graphs[min(k for k in lm.graphs if k >= b)]
    ac_graph = ac.graphs[min(k for k in ac.graphs if k >= b)]
    out["lm_graph_replay_ms"] = timed(lm_graph.replay)
    out["acoustic_graph_replay_ms"] = timed(ac_graph.replay)
    out["lm_decode_call_ms"] = timed(lm.decode)
    out["acoustic_render_call_ms"] = timed(lambda: ac.render(sids, pos, neg))
    embeds, audio = ac.render(sids, pos, neg)
    out["accept_call_ms"] = timed(lambda: lm.accept(decisions, embeds))
    out["noise_draw_ms"] = timed(lambda: ac._noise([ac.streams[s] for s in sids]))

    def whole():
        d, ps, ng = lm.decode()
        e, a = ac.render(sids, ps, ng)
        lm.accept(d, e)
        a.float().cpu()

    torch.cuda.reset_peak_memory_stats()
    out["whole_step_ms"] = timed(whole)
    out["allocated_after_build_gib"] = allocated_after_build / 2**30
    out["peak_in_steps_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # eager pieces of the acoustic frame, to see which part dominates inside its graph
    plan = ac._plan(10)
    cond = torch.cat([pos, neg]).to(ac.dtype)
    noise = torch.randn(b, 64, device="cuda", dtype=ac.dtype)
    cfg = torch.ones(b, 1, device="cuda", dtype=ac.dtype)

    def diffusion():
        def velocity(x, t):
            both = torch.cat([x, x])
            v = ac.diffusion_head(both, torch.full((2 * b,), t, device="cuda", dtype=x.dtype), condition=cond)
            return v[b:] + cfg * (v[:b] - v[b:])

        return plan.sample(velocity, noise)

    with torch.inference_mode():
        out["eager_diffusion_ms"] = timed(diffusion, 20)
        lat = diffusion()[:, None, :]
        out["eager_decode_ms"] = timed(
            lambda: ac.audio_tower.decode(lat, padding_cache=ac.decoder_state.leading(b), use_cache=True), 20
        )
        wav = ac.audio_tower.decode(lat, padding_cache=ac.decoder_state.leading(b), use_cache=True).audio
        out["eager_semantic_ms"] = timed(
            lambda: ac.semantic_encoder(wav, padding_cache=ac.semantic_state.leading(b), use_cache=True), 20
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                ac.audio_tower.decode(lat, padding_cache=ac.decoder_state.leading(b), use_cache=True)
                ac.semantic_encoder(wav, padding_cache=ac.semantic_state.leading(b), use_cache=True)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    out["batch"] = b
    out["compile"] = args.compile
    out["cudnn"] = not args.no_cudnn
    suffix = ("-compiled" if args.compile else "") + ("-nocudnn" if args.no_cudnn else "")
    common.save(f"profile-{args.shape}-b{b}{suffix}", out)


if __name__ == "__main__":
    main()

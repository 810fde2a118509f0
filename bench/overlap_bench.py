"""Would the language model and the acoustic step overlap on one GPU? An upper bound from graph replays.

    python bench/overlap_bench.py --shape 1.5b --cases b64@2K-30K,b256@2K-6K

A plain step runs the language model's decode graph over every stream, then the acoustic graph. A pipelined
step (the two-GPU issue's halves) could run one half's render while the other half decodes, on two CUDA streams
of one process. At 64 and 256 streams the decode is bound by KV bandwidth and the render by its kernel count, so
the two might share the GPU well. This probe replays the engines' own captured graphs, as `vvmesh up` captures
them, with streams placed at each case's positions. A half is the graph over slots [0, n/2), replayed for both
halves: the positions are interleaved, so those slots hold the same spread of lengths as the other half.

- plain: decode(n), then render(n), on one stream;
- halves in turn on one stream: decode(A), render(A), decode(B), render(B);
- halves pipelined on two streams: decode(h) waits for render(h)'s last frame, render(h) for decode(h), so one
  half's render runs beside the other half's decode.

The graphs read and write their usual buffers, so the audio of these replays means nothing; only the times do.
The step's host work (choice, decisions, accept) is left out: the figures bound what overlapping could gain.
"""

from __future__ import annotations

import argparse

import common
import paged_bench as pb
import torch

from services.common.checkpoint import resolve_checkpoint
from services.common.cuda_graphs import bucket_for


def interleaved(positions: list[int]) -> list[int]:
    """Even-indexed positions first: slots [0, n/2) and [n/2, n) then hold the same spread of lengths."""
    return positions[0::2] + positions[1::2]


@torch.inference_mode()
def probe(lm, acoustic, n: int, repeats: int) -> dict:
    """Times of the three schedules over the captured graphs for n streams (halves of n // 2)."""
    limit = lm.max_streams
    decode_all, render_all = lm.graphs[bucket_for(n, limit)], acoustic.graphs[bucket_for(n, acoustic.max_streams)]
    half = n // 2
    decode_half = lm.graphs[bucket_for(half, limit)]
    render_half = acoustic.graphs[bucket_for(half, acoustic.max_streams)]
    main = torch.cuda.current_stream()
    lm_stream, render_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def plain():
        decode_all.replay()
        render_all.replay()

    def halves_in_turn():
        for _ in range(2):
            decode_half.replay()
            render_half.replay()

    decoded = [torch.cuda.Event() for _ in range(2)]
    rendered = [torch.cuda.Event() for _ in range(2)]

    def pipelined(steps: int):
        # Each step: both halves decode and render once; a half's decode waits for its last render. The streams
        # are joined only after `steps` steps, so in steady state step k+1's first decode runs beside step k's
        # second render.
        lm_stream.wait_stream(main)
        render_stream.wait_stream(main)
        for _ in range(steps):
            for h in range(2):
                with torch.cuda.stream(lm_stream):
                    lm_stream.wait_event(rendered[h])
                    decode_half.replay()
                    decoded[h].record()
                with torch.cuda.stream(render_stream):
                    render_stream.wait_event(decoded[h])
                    render_half.replay()
                    rendered[h].record()
        main.wait_stream(lm_stream)
        main.wait_stream(render_stream)

    for e in rendered:
        e.record()
    out = {
        "streams": n,
        "decode_ms": common.gpu_ms(decode_all.replay, repeats),
        "render_ms": common.gpu_ms(render_all.replay, repeats),
        "decode_half_ms": common.gpu_ms(decode_half.replay, repeats),
        "render_half_ms": common.gpu_ms(render_half.replay, repeats),
        "plain_ms": common.gpu_ms(plain, repeats),
        "halves_in_turn_ms": common.gpu_ms(halves_in_turn, repeats),
        "halves_pipelined_ms": common.gpu_ms(lambda: pipelined(1), repeats),
        "pipelined_steady_ms": common.gpu_ms(lambda: pipelined(repeats), 1) / repeats,
    }
    out["frames_per_s_plain"] = n / out["plain_ms"] * 1000
    out["frames_per_s_pipelined"] = n / out["pipelined_steady_ms"] * 1000
    out["pipelined_over_plain"] = out["plain_ms"] / out["pipelined_steady_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--cases", default="b64@2K-30K,b256@2K-6K")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("overlap_bench replays CUDA graphs: it needs a GPU")
    path = common.checkpoint(args.shape)
    ckpt = resolve_checkpoint(str(path))
    ids = common.prompt_ids(path)
    lm, acoustic = pb.build(ckpt, pb.user_defaults())
    configuration = {"max_streams": lm.max_streams, "kv_pages": lm.blocks.usable, "max_context": lm.kv.max_len}
    results: dict = {"shape": args.shape, "configuration": configuration, "rows": []}
    for name in args.cases.split(","):
        positions = interleaved(pb.CASES[name])
        streams = pb.start(lm, acoustic, ids, len(positions), 50, 10_000)
        for s, position in zip(streams, positions, strict=True):
            lm.place(s, (position, min(pb.SEGMENT, position - len(ids)), position - len(ids)))
        for _ in range(3):
            pb.step(lm, acoustic)  # the placed lengths reach the graphs' buffers
        pb.sync()
        row = {"case": name, **probe(lm, acoustic, len(positions), args.repeats)}
        print(row, flush=True)
        results["rows"].append(row)
        common.save(f"overlap-{args.shape}", results)
        pb.finish(lm, acoustic, streams)


if __name__ == "__main__":
    main()

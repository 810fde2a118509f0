"""The lone 45-minute prompt's prefill in the engine, by the way its 4,096-token pieces run.

    python bench/prefill_pieces.py --shape 1.5b

Builds the engine as `vvmesh up` gives it on this GPU, then:

1. The whole prompt, one `lm.prefill(None)` a step as the llm's step loop calls it: per step the time to queue
   it (host), and the time until the GPU finished the prompt (total). Three runs with the piece graphs (the
   default, `services/llm/piece_graphs.py`), then three with the pieces launched op by op (the engine without
   them), then each once more with another Python thread taking the GIL every millisecond, as the services'
   event loops do.
2. One 4,096-token piece at starts 0, 4,096 and 8,192, timed alone by form: the piece graphs; one CUDA graph of
   the whole piece (attention by the Triton kernel the chunk graph replays), with eager and with compiled
   layer parts; eight replays of the 512-token chunk graph; launched.

`--profile DIR` also writes a `torch.profiler` table of one prompt each way.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path

import common
import torch
from paged_bench import LONG_PROMPT, admit, build, filler_prompt, finish, sync, user_defaults
from torch.profiler import ProfilerActivity, profile

from services.common.checkpoint import resolve_checkpoint
from services.common.cuda_graphs import CapturedStep
from services.llm.engine import LMEngine


def whole_prompt(lm: LMEngine, acoustic, ids: list[int], first_id: int, profile_to: Path | None = None) -> dict:
    streams = admit(lm, acoustic, ids, 1, 5, first_id)
    sync()
    host = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    recorder = profile(activities=activities) if profile_to else None
    t0 = time.perf_counter()
    with recorder or contextlib.nullcontext():
        while lm.decoding_count < 1:
            t = time.perf_counter()
            lm.prefill(None)
            host.append((time.perf_counter() - t) * 1000)
        sync()
    total = (time.perf_counter() - t0) * 1000
    if recorder is not None:
        averages = recorder.key_averages()
        keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if torch.cuda.is_available() else [])
        tables = [averages.table(sort_by=key, row_limit=40) for key in keys]
        profile_to.write_text("\n\n".join(tables))
    finish(lm, acoustic, streams)
    steps = [round(h, 1) for h in host]
    return {"host_ms_per_step": steps, "host_ms": round(sum(host), 1), "total_ms": round(total, 1)}


@contextlib.contextmanager
def busy_thread():
    """Another thread that wants the GIL every millisecond."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(2_000))
            time.sleep(0.001)

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def timed(fn, starts: list[int], lm: LMEngine, repeats: int = 5) -> dict[int, float]:
    out = {}
    for start in starts:
        lm.chunk_start.fill_(start)
        fn(start)
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn(start)
        sync()
        out[start] = round((time.perf_counter() - t) / repeats * 1000, 2)
    return out


def one_piece(lm: LMEngine, acoustic, ids: list[int]) -> dict:
    """One piece at several starts, by form, over a prompt's row (its pages hold the positions)."""
    tokens = lm.piece_tokens
    streams = admit(lm, acoustic, ids, 1, 5, 90_000)
    while lm.decoding_count < 1:
        lm.prefill(None)
    row = 3 * streams[0].slot
    lm.chunk_row.fill_(row)
    lm.chunk_tokens.fill_(tokens)
    lm.chunk_inputs.normal_()
    starts = [0, tokens, 2 * tokens]
    results: dict = {}
    if lm.piece_graph is not None:
        results["piece_graphs"] = timed(lm.piece_graph.run, starts, lm)

    def whole_graph(compiled: bool) -> CapturedStep:
        def step():
            offsets = lm._chunk_offsets[:tokens]
            real = offsets < lm.chunk_tokens
            positions = (lm.chunk_start + torch.where(real, offsets, 0))[None]
            x = lm.chunk_inputs[None, :tokens]
            return lm.decoder.forward(x, lm.chunk_row, positions, None, compiled, writes=real[None])

        return CapturedStep(step, torch.cuda.graph_pool_handle())

    for name, compiled in (("one_graph_eager_parts", False), ("one_graph_compiled_parts", True)):
        graph = whole_graph(compiled)
        results[name] = timed(lambda _start, g=graph: g.replay(), starts, lm)
        del graph
    if lm.chunk_graph is not None:

        def chunks(start: int) -> None:
            for k in range(lm.idle_prefill_chunks):
                lm.chunk_start.fill_(start + k * lm.prefill_chunk)
                lm.chunk_tokens.fill_(lm.prefill_chunk)
                lm.chunk_graph.replay()

        results["chunk_graph_replays"] = timed(chunks, starts, lm)
    inputs = torch.randn(tokens, lm.hidden, device=lm.device, dtype=lm.dtype)
    results["launched"] = timed(lambda start: lm._write_chunk(inputs, row, start, None), starts, lm)
    finish(lm, acoustic, streams)
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--profile", type=Path, default=None, help="write profiler tables of one prompt each way here")
    args = p.parse_args()
    path = common.checkpoint(args.shape)
    ckpt = resolve_checkpoint(str(path))
    lm, acoustic = build(ckpt, user_defaults())
    ids = filler_prompt(common.prompt_ids(path), min(LONG_PROMPT, lm.max_positions // 2))
    results: dict = {
        "shape": args.shape,
        "prompt_tokens": len(ids) - 1,
        "configuration": {
            "max_context": lm.kv.max_len,
            "max_streams": lm.max_streams,
            "prefill_chunk": lm.prefill_chunk,
            "piece_tokens": lm.piece_tokens,
            "piece_graphs": lm.piece_graph is not None,
            "chunk_graph": lm.chunk_graph is not None,
            "compiled_decode": lm._compiled,
            "dtype": str(lm.dtype),
        },
        "runs": {},
    }
    print(results["configuration"], flush=True)
    runs = results["runs"]
    padded = lm.padded_chunks
    with torch.inference_mode():
        for way in ("piece_graphs", "launched"):
            # Without padding the engine launches its pieces (on a CPU it pads them eagerly).
            lm.padded_chunks = way == "piece_graphs"
            for i in range(3):
                runs[f"{way}_{i + 1}"] = whole_prompt(lm, acoustic, ids, 50_000 + 10 * len(runs))
                print(way, i + 1, runs[f"{way}_{i + 1}"], flush=True)
            with busy_thread():
                runs[f"{way}_busy_thread"] = whole_prompt(lm, acoustic, ids, 50_000 + 10 * len(runs))
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                whole_prompt(lm, acoustic, ids, 50_000 + 10 * len(runs), args.profile / f"{way}.txt")
        lm.padded_chunks = padded
        if torch.cuda.is_available():  # the forms are CUDA graphs
            results["one_piece_ms_by_start"] = one_piece(lm, acoustic, ids)
            print(results["one_piece_ms_by_start"], flush=True)
    common.save(f"prefill-pieces-{args.shape}", results)


if __name__ == "__main__":
    main()

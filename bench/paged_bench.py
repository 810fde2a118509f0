"""The paged engine at the context users run: step cost by position, throughput, prefill, memory, capacity.

    python bench/paged_bench.py --shape 1.5b
    python bench/paged_bench.py --shape 7b --cases b1@15K --no-prefill --no-memory

Runs the configuration `vvmesh up` gives (the model's own context, CUDA graphs of compiled code, the default
stream limit and memory fraction) and prints it with the figures. Streams are put at the positions of a case
with `LMEngine.place` (their pages hold arbitrary keys), so a step costs what it costs that far into a script
without generating the script first. The reference (transformers' `generate()`) is timed in the same run at
the batch-1 case's position: the time of 24 steps less that of 4, so its prefill drops out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import time

import common
import numpy as np
import torch
from kernel_table import profile_steps

from services.acoustic.engine import AcousticEngine
from services.common import tensors
from services.common.audio import FRAME_MS
from services.common.checkpoint import resolve_checkpoint
from services.common.model_args import resolve_dtype
from services.common.reference import load_reference
from services.llm import decoder, memory_plan, paged_attention, paged_kv
from services.llm.engine import IDLE_PREFILL_CHUNKS, LMEngine, LMStream
from services.llm.runner import StepPlan, StepRunner
from services.llm.server import parser as llm_parser
from services.render.audio_out import AudioRouter
from services.render.local import LocalLink
from services.render.values import RenderStep, StreamSpec

CASES = {
    "b1@30K": [30_000],
    "b1@15K": [15_000],
    "b64@2K-30K": np.linspace(2_000, 30_000, 64).astype(int).tolist(),
    "b256@2K-6K": np.linspace(2_000, 6_000, 256).astype(int).tolist(),
    "cpu-smoke": [600, 900, 1200],  # the tiny model on a CPU: the bench's own code paths, no figures
}
SEGMENT = 300  # frames into the current segment: the negative branch's length
LONG_PROMPT = 12_555  # the 45-minute demo script's prompt tokens
TEN_MINUTES = (2_000, 4_500)  # prompt tokens, frames
NINETY_MINUTES = (24_000, 40_500)


def filler_prompt(ids: list[int], length: int) -> list[int]:
    """`ids` stretched to `length` tokens by repeating its text, its ending (audio_bos) kept last."""
    body = ids[:-1] * (length // max(1, len(ids) - 1) + 1)
    return body[: length - 1] + ids[-1:]


def reference_ms_per_step(model, ids: list[int]) -> float:
    generate = common.forced_reference(model, ids)

    def go(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate(n)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    go(2)  # warm-up
    return (go(24) - go(4)) / 20 * 1000


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def user_defaults(*more: str) -> argparse.Namespace:
    """What `vvmesh up` gives the llm on this machine (the server's own parser and defaults), and `more` options."""
    return llm_parser().parse_args(["--device", DEVICE, *more])


def build(
    ckpt,
    defaults: argparse.Namespace,
    kv_pages: int | None = None,
    max_streams: int | None = None,
    idle_prefill_chunks: int = IDLE_PREFILL_CHUNKS,
):
    t = time.perf_counter()
    streams = max_streams or defaults.max_streams
    graphs, compiled = not defaults.no_cuda_graphs, not defaults.no_compile
    dtype = resolve_dtype(defaults)
    acoustic = AcousticEngine(ckpt, defaults.device, dtype, streams, graphs, compiled)
    lm = LMEngine(
        ckpt,
        defaults.device,
        dtype,
        max_streams=streams,
        max_context=defaults.max_context,
        kv_pages=kv_pages,
        prefill_chunk=defaults.prefill_chunk,
        memory_fraction=defaults.gpu_memory_fraction,
        cuda_graphs=graphs,
        torch_compile=compiled,
        prefill_graphs=not defaults.no_prefill_graphs,
        idle_prefill_chunks=idle_prefill_chunks,
    )
    print(f"engines built in {time.perf_counter() - t:.0f} s", flush=True)
    return lm, acoustic


ACOUSTIC_IDS: dict[int, int] = {}  # id(LMStream) -> its acoustic stream id


def admit(lm: LMEngine, acoustic: AcousticEngine, ids: list[int], n: int, frames: int, first_id: int):
    streams = [LMStream(ids, None, fixed_frames=frames, max_frames=frames) for _ in range(n)]
    # Keyed, as the gateway's streams are: their frames go to a mailbox each, which a subscriber drains.
    key = "bench-{}" if FRAMES_TO == "consumers" else ""
    specs = [StreamSpec(first_id + i, i, 1.3, 10, audio_key=key.format(first_id + i)) for i in range(n)]
    for s, spec in zip(streams, specs, strict=True):
        assert lm.admit(s), "no room to admit"
        ACOUSTIC_IDS[id(s)] = spec.stream_id
    link = runner(lm, acoustic).link
    LOOP.run_until_complete(link.step(RenderStep(starts=specs)))
    if link.audio_out is not None:
        DRAINS.update(LOOP.create_task(drain(link.audio_out, spec.audio_key)) for spec in specs)
    return streams


async def drain(router: AudioRouter, key: str) -> None:
    """A consumer that reads every frame as it comes."""
    async for _ in router.subscribe(key):
        pass


def start(lm: LMEngine, acoustic: AcousticEngine, ids: list[int], n: int, frames: int, first_id: int):
    streams = admit(lm, acoustic, ids, n, frames, first_id)
    while lm.decoding_count < len(lm.streams):
        lm.prefill(1 << 20)
    return streams


PHASES: dict[str, list[float]] = {"lm": [], "acoustic": []}
LOOP = asyncio.new_event_loop()  # one loop (and thread pool) for every step, as in the llm's server
RUNNERS: dict[tuple[int, str], StepRunner] = {}
# Where the frames go: "consumers" (keyed streams' mailboxes, as in the mesh) or "llm" (to the llm's host).
FRAMES_TO = "consumers"
DRAINS: set[asyncio.Task] = set()


def runner(lm: LMEngine, acoustic: AcousticEngine) -> StepRunner:
    if (id(lm), FRAMES_TO) not in RUNNERS:
        router = AudioRouter() if FRAMES_TO == "consumers" else None
        RUNNERS[id(lm), FRAMES_TO] = StepRunner(lm, LocalLink(acoustic, router))
    return RUNNERS[id(lm), FRAMES_TO]


def step(lm: LMEngine, acoustic: AcousticEngine, prefill_budget: int | None = 0) -> int:
    """One step through the runner the llm's step loop uses (in-process render); records where it went."""
    out = LOOP.run_until_complete(runner(lm, acoustic).step(StepPlan(prefill_budget=prefill_budget), ACOUSTIC_IDS))
    PHASES["lm"].append(out.phase_ms["prefill"] + out.phase_ms["decode"])  # ends in the choice's device-to-host copy
    PHASES["acoustic"].append(out.phase_ms["render"] + out.phase_ms["to host"])
    for d in out.decisions:
        if d.finish is not None:  # the runner's message already ended it on the acoustic side
            lm.release(d.stream)
            ACOUSTIC_IDS.pop(id(d.stream))
    return sum(d.speech for d in out.decisions)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def finish(lm: LMEngine, acoustic: AcousticEngine, streams) -> None:
    ended = [s for s in streams if id(s) in ACOUSTIC_IDS]
    for s in ended:
        lm.release(s)
    link = runner(lm, acoustic).link
    LOOP.run_until_complete(link.step(RenderStep(ends=[ACOUSTIC_IDS.pop(id(s)) for s in ended])))
    LOOP.run_until_complete(link.routed())
    drains = [t for t in DRAINS if not t.done()]
    DRAINS.clear()
    if drains:
        LOOP.run_until_complete(asyncio.wait(drains, timeout=5))  # their streams ended: each reads to the end


@torch.inference_mode()
def attention_probe(lm: LMEngine, streams: int) -> dict:
    """One layer's attention for the rows of this case: the paged decode kernel (what the graphs run) against
    gathering the rows' keys for SDPA up to the longest row."""
    rows = 3 * streams
    attn = lm.lm.layers[0].self_attn
    heads = attn.config.num_attention_heads
    q = torch.randn(rows, heads, 1, attn.head_dim, device="cuda", dtype=lm.dtype)
    positions = lm.positions[:streams].reshape(-1)
    keys = int(positions.max()) + 1
    k, v = lm.kv.k[0], lm.kv.v[0]
    kv_rows = torch.arange(rows, device="cuda")

    def paged():
        lengths = (positions + 1).to(torch.int32)
        return paged_attention.paged_decode(q, k, v, lm.kv.page_table[:rows], lengths, attn.scaling, lm.kv.page_size)

    def gathered():
        index = lm.kv.gather_index(kv_rows, keys)
        visible = paged_kv.causal_visibility(keys, positions[:, None])
        return paged_kv.gathered(q, k, v, index, visible, attn.scaling)

    return {"paged_decode": common.gpu_ms(paged), "gathered_sdpa": common.gpu_ms(gathered), "keys": keys}


def case_run(lm, acoustic, ids: list[int], name: str, positions: list[int], steps: int, kernels: int = 0) -> dict:
    streams = start(lm, acoustic, ids, len(positions), steps + kernels + 20, 10_000)  # none ends while timed
    for s, p in zip(streams, positions, strict=True):
        lm.place(s, (p, min(SEGMENT, p - len(ids)), p - len(ids)))
    for _ in range(3):
        step(lm, acoustic)
    sync()
    PHASES["lm"].clear()
    PHASES["acoustic"].clear()
    t = time.perf_counter()
    frames = sum(step(lm, acoustic) for _ in range(steps))
    sync()
    elapsed = time.perf_counter() - t
    attention = attention_probe(lm, len(positions)) if lm.device.type == "cuda" else None
    profiled = None
    if kernels and lm.device.type == "cuda":
        trace = str(common.out_dir() / f"steps-{name.replace('@', '-at-')}.json")
        profiled = profile_steps(lambda: step(lm, acoustic), kernels, trace=trace)
    finish(lm, acoustic, streams)
    ms = elapsed / steps * 1000
    return {
        **({"kernel_profile": profiled} if profiled else {}),
        "lm_ms": float(np.median(PHASES["lm"])),
        "attention_one_layer_ms": attention,
        "acoustic_ms": float(np.median(PHASES["acoustic"])),
        "case": name,
        "streams": len(positions),
        "positions": [min(positions), max(positions)],
        "ms_per_step": ms,
        "frames_per_s": frames / elapsed,
        "real_time_factor": ms / FRAME_MS,
    }


def prefill_run(lm, acoustic, ids: list[int], playing: int, arrivals: int, base: list[int]) -> dict:
    """Time to first frame of a long prompt, alone or arriving with others while `playing` streams play: the
    longest step any playing stream sees."""
    long_ids = filler_prompt(ids, min(LONG_PROMPT, lm.max_positions // 2))
    play = start(lm, acoustic, base, playing, 10_000, 20_000) if playing else []
    for s in play:
        lm.place(s, (4_000, SEGMENT, 4_000 - len(base)))
    for _ in range(3):
        step(lm, acoustic)
    sync()
    new = admit(lm, acoustic, long_ids, arrivals, 50, 30_000)
    t0 = time.perf_counter()
    first_frame = None
    longest = 0.0
    while first_frame is None or lm.decoding_count < playing + arrivals:
        t = time.perf_counter()
        step(lm, acoustic, None)  # the llm's own budget: one chunk a step, larger while nothing plays
        if playing:  # the longest step a playing stream sees; a lone prompt's steps overlap, as in the llm
            sync()
        longest = max(longest, (time.perf_counter() - t) * 1000)
        if first_frame is None and any(s.frames for s in new):
            first_frame = (time.perf_counter() - t0) * 1000
        if time.perf_counter() - t0 > 60:
            break
    finish(lm, acoustic, play + new)
    return {
        "playing": playing,
        "arrivals": arrivals,
        "prompt_tokens": len(long_ids),
        "first_frame_ms": first_frame,
        "longest_step_ms": longest,
    }


def weights_bytes(lm: LMEngine, acoustic: AcousticEngine | None = None) -> int:
    modules = [lm.lm]
    if acoustic is not None:
        modules += [
            acoustic.audio_tower,
            acoustic.semantic_encoder,
            acoustic.diffusion_head,
            acoustic.acoustic_connector,
            acoustic.semantic_connector,
        ]
    total = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return total + lm.head_rows.numel() * lm.head_rows.element_size()


def capacity_plan(lm: LMEngine, gib: float) -> dict:
    """What `LMEngine` would plan on a GPU of `gib` GiB with the llm alone on it (the Kubernetes layout)."""
    defaults = user_defaults()
    weights = weights_bytes(lm)
    ps = lm.blocks.page_size
    ceiling = memory_plan.ceiling_pages(defaults.max_streams, lm.kv.max_len, ps)
    pages = memory_plan.planned_pages(int(gib * 2**30), defaults.gpu_memory_fraction, weights, lm.page_bytes, ceiling)
    return {
        "gpu_gib": gib,
        "weights_gib": weights / 2**30,
        "kv_pages": pages,
        "kv_gib": pages * lm.page_bytes / 2**30,
        "ten_minute_streams": memory_plan.streams_that_fit(pages, ps, *TEN_MINUTES),
        "ninety_minute_streams": memory_plan.streams_that_fit(pages, ps, *NINETY_MINUTES),
    }


def one_long_job_memory(ckpt, ids: list[int], history: str | None = None) -> dict:
    """Peak memory of one 90-minute job at its last position, with the pool sized to that job; `stages` splits it
    into what each phase holds after it and its own peak. `history`: also write the allocator's history there
    (a `torch.cuda.memory._snapshot()` pickle, for `bench/memory_peak.py`)."""
    prompt, frames = NINETY_MINUTES
    lm = None
    gc.collect()
    torch.cuda.empty_cache()
    if history:
        torch.cuda.memory._record_memory_history(max_entries=500_000)
    defaults = user_defaults()
    probe_pages = memory_plan.expected_pages(prompt, frames, 128) + 1
    stages: dict[str, dict] = {}
    torch.cuda.reset_peak_memory_stats()
    start_bytes, start_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def stage(name: str) -> None:
        torch.cuda.synchronize()
        stages[name] = {
            "allocated_gib": (torch.cuda.memory_allocated() - start_bytes) / 2**30,
            "peak_gib": (torch.cuda.max_memory_allocated() - start_bytes) / 2**30,
            # what the allocator holds from the device: the graphs' pools (held whole, tensors live or not) and
            # its cache
            "reserved_gib": (torch.cuda.max_memory_reserved() - start_reserved) / 2**30,
        }
        torch.cuda.reset_peak_memory_stats()

    lm, acoustic = build(ckpt, defaults, kv_pages=probe_pages, max_streams=1)
    stage("engines built")
    job_kv = (probe_pages - 1) * lm.page_bytes
    weights = weights_bytes(lm, acoustic)
    conv = acoustic.decoder_state.bytes_per_row() + acoustic.semantic_state.bytes_per_row()
    long_ids = filler_prompt(ids, prompt)
    streams = start(lm, acoustic, long_ids, 1, 20, 40_000)
    stage("prompt prefilled")
    lm.place(streams[0], (prompt + frames - 1, SEGMENT, frames - 1))
    for _ in range(10):
        step(lm, acoustic)
    stage("steps at the last position")
    peak = max(s["peak_gib"] for s in stages.values()) * 2**30
    if history:
        torch.cuda.memory._dump_snapshot(history)
        torch.cuda.memory._record_memory_history(enabled=None)
    finish(lm, acoustic, streams)
    return {
        "prompt_tokens": prompt,
        "frames": frames,
        "weights_gib": weights / 2**30,
        "job_kv_gib": job_kv / 2**30,
        "conv_state_gib": conv / 2**30,
        "peak_gib": peak / 2**30,
        "peak_reserved_gib": max(s["reserved_gib"] for s in stages.values()),
        "stages": stages,
        "peak_over_weights_plus_kv": peak / (weights + job_kv + conv),
        # the bound: weights plus 1.1 times the job's own KV
        "target_gib": (weights + 1.1 * job_kv) / 2**30,
        "within_target": peak <= weights + 1.1 * job_kv,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--cases", default="b1@30K,b64@2K-30K,b256@2K-6K")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the one 90-minute job's peak memory")
    p.add_argument("--memory-history", help="write the 90-minute job's allocator history to this pickle")
    p.add_argument(
        "--mlp-tokens", type=int, default=decoder.MLP_TOKENS, help="a prompt piece's MLP, this many tokens at a time"
    )
    p.add_argument("--playing", type=int, default=64, help="streams playing while the long prompts arrive")
    p.add_argument("--no-prefill-graphs", action="store_true", help="the llm's --no-prefill-graphs")
    p.add_argument("--kernels", type=int, default=0, help="profile this many steps of each case, kernel by kernel")
    p.add_argument(
        "--copies",
        default="pinned",
        help="host-to-device copies: pinned (the services'), pageable (each waits for the device), or both, "
        "each case timed with each in turn",
    )
    p.add_argument(
        "--frames",
        default="consumers",
        choices=["consumers", "llm", "both"],
        help="where each frame's audio goes: consumers (keyed streams' mailboxes, as in the mesh), the llm's host "
        "(before each step returns), or both, each case timed with each in turn",
    )
    p.add_argument(
        "--idle-chunks",
        type=int,
        default=IDLE_PREFILL_CHUNKS,
        help="prompt chunks a step with nothing playing (the llm's piece, captured at start-up)",
    )
    args = p.parse_args()
    path = common.checkpoint(args.shape)
    ckpt = resolve_checkpoint(str(path))
    ids = common.prompt_ids(path)
    cases = args.cases.split(",")
    results: dict = {"shape": args.shape, "rows": [], "mlp_tokens": args.mlp_tokens}
    decoder.MLP_TOKENS = args.mlp_tokens
    if args.memory_only:
        results["one_long_job"] = one_long_job_memory(ckpt, ids, args.memory_history)
        common.save(f"paged-{args.shape}-memory", results)
        return

    if not args.no_reference:
        position = CASES[cases[0]][0]
        ref = load_reference(path, dtype=torch.bfloat16, device="cuda")
        results["reference"] = {
            "position": position,
            "ms_per_step": reference_ms_per_step(ref, filler_prompt(ids, position)),
        }
        print(results["reference"], flush=True)
        del ref
        gc.collect()
        torch.cuda.empty_cache()

    defaults = user_defaults(*(["--no-prefill-graphs"] if args.no_prefill_graphs else []))
    lm, acoustic = build(ckpt, defaults, idle_prefill_chunks=args.idle_chunks)
    results["configuration"] = {
        "max_context": lm.kv.max_len,
        "max_streams": lm.max_streams,
        "gpu_memory_fraction": defaults.gpu_memory_fraction,
        "prefill_chunk": lm.prefill_chunk,
        "cuda_graphs": bool(lm.graphs),
        "prefill_graphs": lm.chunk_graph is not None,
        "idle_prefill_tokens": lm.piece_tokens,
        "piece_graph": lm.piece_graph is not None,
        "compiled": lm._compiled,
        "page_size": lm.blocks.page_size,
        "kv_pages": lm.blocks.usable,
        "kv_pool_gib": lm.blocks.pages * lm.page_bytes / 2**30,
        "dtype": str(lm.dtype),
        "device": DEVICE,
    }
    print(results["configuration"], flush=True)
    copies = ["pinned", "pageable"] if args.copies == "both" else [args.copies]
    frames_to = ["consumers", "llm"] if args.frames == "both" else [args.frames]
    global FRAMES_TO
    for name in cases:
        for mode, FRAMES_TO in itertools.product(copies, frames_to):
            tensors.PINNED_COPIES = mode == "pinned"
            row = {**case_run(lm, acoustic, ids, name, CASES[name], args.steps, args.kernels), "copies": mode}
            row["frames_to"] = FRAMES_TO
            if "reference" in results and row["streams"] == 1:
                row["speedup_vs_reference"] = results["reference"]["ms_per_step"] / row["ms_per_step"]
            results["rows"].append(row)
            print(row, flush=True)
            common.save(f"paged-{args.shape}", results)  # each row as it comes: a run cut short keeps them
    tensors.PINNED_COPIES = True
    FRAMES_TO = frames_to[0]
    if not args.no_prefill:
        # The first long prompt after start-up also pays one-time costs (kernels loaded on first use): timed
        # apart from a second one, which is what every later request sees.
        results["prefill"] = [
            {**prefill_run(lm, acoustic, ids, 0, 1, ids), "first_after_start": True},
            prefill_run(lm, acoustic, ids, 0, 1, ids),
            prefill_run(lm, acoustic, ids, args.playing, 8, ids),
        ]
        print(results["prefill"], flush=True)
        common.save(f"paged-{args.shape}", results)
    results["capacity"] = [capacity_plan(lm, 22.0), capacity_plan(lm, 139.8)]  # an A10G's usable 24 GB; an H200
    print(results["capacity"], flush=True)
    results["preemptions"] = lm.preemptions
    del lm, acoustic
    RUNNERS.clear()  # a runner holds its engines: the memory case must start from an empty GPU
    if not args.no_memory:
        results["one_long_job"] = one_long_job_memory(ckpt, ids, args.memory_history)
    common.save(f"paged-{args.shape}", results)


if __name__ == "__main__":
    main()

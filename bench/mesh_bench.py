"""The whole mesh on one GPU, through Envoy: throughput of the llm with the acoustic engine in-process and
as a separate gRPC service, and time to first audio with and without 32 streams playing.

    python bench/mesh_bench.py --shape 1.5b
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import common
import grpc
import numpy as np
import soundfile as sf
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.common.frames import FRAME_MS, SAMPLE_RATE
from services.common.grpc_server import CHANNEL_OPTIONS
from services.mesh import Mesh, Ports

DATA = common.ROOT / ".benchdata"
DEMO = common.ROOT.parent / "shared" / "testdata" / "vibevoice-demo"  # beside the checkout, where it is
VOICE_SECONDS = 10
BACKGROUND_FRAMES = 1500  # long enough to outlast the arrivals, short enough for --max-context 2048


def ensure_data() -> None:
    """The script and the 10-second voice the requests use: the demo's when it is beside the checkout, else the
    bench's own script and seeded noise (random weights: what the audio sounds like does not change the timing)."""
    DATA.mkdir(exist_ok=True)
    script, voice = DATA / "2p_short.txt", DATA / "voice10s.wav"
    if not script.exists():
        demo = DEMO / "scripts" / "2p_short.txt"
        script.write_text(demo.read_text() if demo.exists() else common.SCRIPT)
    if not voice.exists():
        demo = DEMO / "voices" / "en-Carter_man.wav"
        if demo.exists():
            samples, rate = sf.read(demo, dtype="float32", frames=VOICE_SECONDS * sf.info(demo).samplerate)
        else:
            samples, rate = 0.05 * np.random.default_rng(0).standard_normal(VOICE_SECONDS * SAMPLE_RATE), SAMPLE_RATE
        sf.write(voice, samples, rate)


async def stream(stub, request, record: dict) -> None:
    """One request; records send time, every chunk's arrival, and the final status."""
    record["sent"] = time.perf_counter()
    record["chunks"] = []
    try:
        # one API key per stream: the benchmark is many clients, not one client over Envoy's per-client rate
        metadata = (("x-api-key", f"bench-{request.options.seed}"),)
        async for response in stub.Synthesize(request, metadata=metadata):
            if response.WhichOneof("event") == "audio" and response.audio.data:
                record["chunks"].append(time.perf_counter())
        record["status"] = "OK"
    except grpc.aio.AioRpcError as e:
        record["status"] = e.code().name


def request(frames: int, voice: bytes | None, seed: int) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(
        text=(DATA / "2p_short.txt").read_text(),
        voices=[tts_pb2.VoicePrompt(speaker=1, audio=voice)] if voice else [],
        format=tts_pb2.AUDIO_FORMAT_PCM16,
        options=tts_pb2.GenerationOptions(seed=seed, fixed_frames=frames),
    )


def steady_throughput(records: list[dict]) -> float:
    """Frames per second while every stream was playing (last first chunk to first last chunk)."""
    start = max(r["chunks"][0] for r in records)
    end = min(r["chunks"][-1] for r in records)
    frames = sum(sum(1 for t in r["chunks"] if start < t <= end) for r in records)
    return frames / (end - start)


async def batch_run(address: str, batch: int, frames: int) -> dict:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = tts_pb2_grpc.TextToSpeechStub(ch)
        records = [{} for _ in range(batch)]
        await asyncio.gather(*(stream(stub, request(frames, None, i), r) for i, r in enumerate(records)))
    assert all(r["status"] == "OK" and len(r["chunks"]) == frames for r in records), records[0].get("status")
    fps = steady_throughput(records)
    return {"batch": batch, "frames": frames, "frames_per_s": fps, "ms_per_step": batch / fps * 1000}


def ttfa(r: dict) -> float:
    return (r["chunks"][0] - r["sent"]) * 1000


async def ttfa_run(address: str, voice: bytes, playing: int) -> dict:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = tts_pb2_grpc.TextToSpeechStub(ch)
        await stream(stub, request(4, voice, 0), {})  # warm the voice path once
        alone = []
        for i in range(20):
            r = {}
            await stream(stub, request(8, voice, 100 + i), r)
            alone.append(ttfa(r))

        background = [{} for _ in range(playing)]
        tasks = [
            asyncio.create_task(stream(stub, request(BACKGROUND_FRAMES, None, 200 + i), r))
            for i, r in enumerate(background)
        ]
        while not all(r.get("chunks") for r in background):
            failed = [r["status"] for r in background if "status" in r]
            if failed:
                raise RuntimeError(f"a playing stream ended early: {failed[0]}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        window_start = time.perf_counter()
        arrivals = [{} for _ in range(20)]
        arrival_tasks = []
        for i, r in enumerate(arrivals):
            arrival_tasks.append(asyncio.create_task(stream(stub, request(8, voice, 300 + i), r)))
            await asyncio.sleep(0.25)
        await asyncio.gather(*arrival_tasks)
        window_end = time.perf_counter()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    gaps = []
    for r in background:
        ts = [t for t in r["chunks"] if window_start <= t <= window_end]
        gaps += [(b - a) * 1000 for a, b in zip(ts, ts[1:], strict=False)]
    loaded = sorted(ttfa(r) for r in arrivals)
    return {
        "ttfa_alone_ms": {"p50": statistics.median(alone), "p95": sorted(alone)[18], "max": max(alone)},
        "ttfa_with_streams_playing_ms": {"p50": statistics.median(loaded), "p95": loaded[18], "max": loaded[-1]},
        "max_gap_between_chunks_ms": max(gaps),
        "p99_gap_between_chunks_ms": sorted(gaps)[int(len(gaps) * 0.99)],
        "frame_ms": FRAME_MS,
        "streams_playing": playing,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--frames", type=int, default=common.FRAMES)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--modes",
        default="local,remote,wire",
        help="local: acoustic inside the llm; remote: its own process (tensors in shared GPU memory); "
        "wire: its own process, tensors in the gRPC messages",
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--playing", type=int, default=32, help="streams playing while new requests arrive")
    args = p.parse_args()
    path = common.checkpoint(args.shape)
    ensure_data()
    voice = (DATA / "voice10s.wav").read_bytes()
    results: dict = {"shape": args.shape, "modes": {}}
    for mode in args.modes.split(","):
        mesh = Mesh(
            ports=Ports.free(),
            model=str(path),
            device=args.device,
            dtype="bfloat16" if args.device == "cuda" else "float32",
            allow_fixed_frames=True,
            acoustic="local" if mode == "local" else "remote",
            max_streams=64,
            llm_args=["--max-context", "2048", *(["--no-shared-gpu-memory"] if mode == "wire" else [])],
            log_dir=Path(common.out_dir()) / f"logs-{mode}",
        )
        t = time.perf_counter()
        with mesh:
            started = time.perf_counter() - t
            address = f"127.0.0.1:{mesh.ports.envoy}"
            rows = [asyncio.run(batch_run(address, int(b), args.frames)) for b in args.batches.split(",")]
            entry = {"startup_s": started, "rows": rows}
            if mode == "remote" and not args.skip_latency:
                entry["latency"] = asyncio.run(ttfa_run(address, voice, args.playing))
            results["modes"][mode] = entry
            print(mode, entry, flush=True)
    if "local" in results["modes"]:
        local = {r["batch"]: r["frames_per_s"] for r in results["modes"]["local"]["rows"]}
        for mode in ("remote", "wire"):
            for r in results["modes"].get(mode, {}).get("rows", []):
                r["vs_in_process"] = r["frames_per_s"] / local[r["batch"]]
    common.save(f"mesh-{args.shape}", results)


if __name__ == "__main__":
    main()

"""Real-time streams through Envoy and the whole mesh, in the configuration `vvmesh up` gives on one GPU.

    python bench/realtime_bench.py --shape 1.5b --streams 192,128

1. Concurrency. N ten-minute scripts (about 2,000 prompt tokens and two voices each, 4,500 frames) arrive one
   every `--arrival-s` seconds; the run ends `--hold-s` seconds after the last arrival. A stream keeps up with
   real time when every chunk arrives before it is due (chunk k by its first chunk's arrival plus k frames of
   playback) and no gap after its first chunk exceeds one frame (133 ms). Reported per N: streams late or
   gapped, the largest gap and lateness, time to first audio, frames/s.
2. The 45-minute demo script with its four voices: time to first audio alone (voices the acoustic service has
   encoded before, then four it has not seen); then, with 64 ten-minute streams playing, 8 of them arriving at
   once: the largest gap any playing stream sees, and their first audio.

Frames come from `fixed_frames` (random weights decide nothing useful), which needs `allow_fixed_frames`; every
other option is the default. Clients run in several processes, each stream with its own API key, so the
client side does not pace the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import common
import grpc
import soundfile
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.common.audio import FRAME_MS
from services.common.grpc_server import CHANNEL_OPTIONS
from services.mesh import LLMConfig, Mesh, Ports

DEMO = Path(os.environ.get("VVMESH_TESTDATA", common.ROOT.parent / "shared" / "testdata")) / "vibevoice-demo"
LONG_SCRIPT = DEMO / "scripts" / "4p_climate_45min.txt"
VOICES = sorted((DEMO / "voices").glob("en-*.wav"))
TEN_MINUTE_TOKENS, TEN_MINUTE_FRAMES = 2_000, 4_500
CLIENT_PROCESSES = 8


def ten_minute_script(path: Path) -> str:
    """The 45-minute script's opening turns of two speakers, up to about 2,000 prompt tokens."""
    lines = [line for line in LONG_SCRIPT.read_text().splitlines() if line.strip()]
    turns = [line for line in lines if line.startswith(("Speaker 1:", "Speaker 2:"))]
    text = ""
    for line in turns:
        longer = f"{text}{line}\n"
        if len(common.prompt_ids(path, longer)) > TEN_MINUTE_TOKENS:
            break
        text = longer
    return text


def voice_audio(path: Path, variant: int) -> bytes:
    """The voice file; a `variant` > 0 starts `variant` samples later, so the acoustic service has never encoded
    it (a new user's voice) while it sounds the same."""
    if not variant:
        return path.read_bytes()
    samples, rate = soundfile.read(path, dtype="int16")
    out = io.BytesIO()
    soundfile.write(out, samples[variant:], rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def synthesize(text: str, speakers: int, frames: int, seed: int, voice_variant: int = 0) -> bytes:
    voices = [tts_pb2.VoicePrompt(speaker=i + 1, audio=voice_audio(VOICES[i], voice_variant)) for i in range(speakers)]
    request = tts_pb2.SynthesizeRequest(
        text=text,
        voices=voices,
        format=tts_pb2.AUDIO_FORMAT_PCM16,
        options=tts_pb2.GenerationOptions(seed=seed, fixed_frames=frames),
    )
    return request.SerializeToString()


# ---------------------------------------------------------------- clients (one process per share of streams)


async def _one(stub, request: bytes, start_at: float, end_at: float, key: str) -> dict:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    record: dict = {"sent": time.monotonic(), "chunks": [], "status": "CANCELLED"}
    call = stub.Synthesize(tts_pb2.SynthesizeRequest.FromString(request), metadata=(("x-api-key", key),))

    async def read() -> None:
        async for response in call:
            if response.WhichOneof("event") == "audio" and response.audio.data:
                record["chunks"].append(time.monotonic())
        record["status"] = "OK"

    try:
        await asyncio.wait_for(read(), timeout=max(0.1, end_at - time.monotonic()))
    except TimeoutError:
        call.cancel()
    except grpc.aio.AioRpcError as e:
        record["status"] = e.code().name
    return record


async def _clients(address: str, plans: list[tuple[bytes, float, float, str]]) -> list[dict]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        return await asyncio.gather(*(_one(stub, *plan) for plan in plans))


def _client_process(args: tuple[str, list[tuple[bytes, float, float, str]]]) -> list[dict]:
    return asyncio.run(_clients(*args))


def run_streams(pool, address: str, plans: list[tuple[bytes, float, float, str]]) -> list[dict]:
    """Every plan (request, start time, end time, API key) as a stream; records in the plans' order."""
    shares = [plans[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    answers = pool.map(_client_process, [(address, share) for share in shares])
    records: list[dict] = [{}] * len(plans)
    for i, answer in enumerate(answers):
        records[i::CLIENT_PROCESSES] = answer
    return records


# ---------------------------------------------------------------- what the records say


def gaps_ms(chunks: list[float], start: float = 0.0, end: float = float("inf")) -> list[float]:
    """The gaps between consecutive chunks that overlap [start, end], those across its edges included."""
    return [(b - a) * 1000 for a, b in zip(chunks, chunks[1:], strict=False) if b >= start and a <= end]


def lateness_ms(chunks: list[float]) -> float:
    """How far the latest chunk came after it was due (chunk k by the first chunk plus k frames); <= 0: on time."""
    return max(((t - chunks[0]) * 1000 - k * FRAME_MS for k, t in enumerate(chunks)), default=0.0)


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return {
        "p50": statistics.median(values),
        "p95": values[max(0, math.ceil(0.95 * len(values)) - 1)],
        "max": values[-1],
    }


def first_audio_ms(r: dict) -> float | None:
    return (r["chunks"][0] - r["sent"]) * 1000 if r["chunks"] else None


def concurrency_run(
    pool, address: str, script: str, streams: int, arrival_s: float, hold_s: float, voices: int = 2
) -> dict:
    t0 = time.monotonic() + 1.0
    end = t0 + streams * arrival_s + hold_s
    plans = [
        (synthesize(script, voices, TEN_MINUTE_FRAMES, 1_000 + i), t0 + i * arrival_s, end, f"rt-{streams}-{i}")
        for i in range(streams)
    ]
    records = run_streams(pool, address, plans)
    started = [r for r in records if r["chunks"]]
    worst_gap = [max(gaps_ms(r["chunks"]), default=0.0) for r in started]
    late = [lateness_ms(r["chunks"]) for r in started]
    last_first = max((r["chunks"][0] for r in started), default=end)
    frames_in_window = sum(sum(1 for t in r["chunks"] if t > last_first) for r in started)
    row = {
        "streams": streams,
        "voices": voices,
        "statuses": {s: sum(1 for r in records if r["status"] == s) for s in {r["status"] for r in records}},
        "started": len(started),
        "streams_with_a_gap_over_a_frame": sum(1 for g in worst_gap if g > FRAME_MS),
        "streams_with_a_late_chunk": sum(1 for x in late if x > 0),
        "largest_gap_ms": max(worst_gap, default=None),
        "p95_gap_ms": percentiles([g for r in started for g in gaps_ms(r["chunks"])]).get("p95"),
        "latest_chunk_ms": max(late, default=None),
        "first_audio_ms": percentiles([first_audio_ms(r) for r in started]),
        "frames_per_s_all_playing": frames_in_window / (end - last_first) if end > last_first + 1 else None,
        "frames_per_stream": percentiles([len(r["chunks"]) for r in started]),
    }
    row["real_time"] = row["started"] == streams and not row["streams_with_a_gap_over_a_frame"]
    return row


def long_script_run(pool, address: str, short: str, playing: int, arrivals: int) -> dict:
    long_text = LONG_SCRIPT.read_text()
    alone, new_voices = [], []
    for i in range(3):
        now = time.monotonic()
        plan = (synthesize(long_text, 4, 8, 50 + i), now, now + 60, f"long-alone-{i}")
        alone.append(first_audio_ms(run_streams(pool, address, [plan])[0]))
    for i in range(2):  # four voices the acoustic service has not seen: their encoding is in the first audio
        now = time.monotonic()
        plan = (synthesize(long_text, 4, 8, 60 + i, voice_variant=1 + i), now, now + 60, f"long-new-voices-{i}")
        new_voices.append(first_audio_ms(run_streams(pool, address, [plan])[0]))
    t0 = time.monotonic() + 1.0
    arrive = t0 + playing * 0.25 + 5.0
    end = arrive + 30.0
    plans = [
        (synthesize(short, 2, TEN_MINUTE_FRAMES, 2_000 + i), t0 + i * 0.25, end, f"play-{i}") for i in range(playing)
    ]
    plans += [(synthesize(long_text, 4, 40, 3_000 + i), arrive, end, f"long-{i}") for i in range(arrivals)]
    records = run_streams(pool, address, plans)
    background, new = records[:playing], records[playing:]
    last_first = max((r["chunks"][0] for r in new if r["chunks"]), default=end)
    window = [g for r in background for g in gaps_ms(r["chunks"], arrive, last_first)]
    return {
        "prompt": LONG_SCRIPT.name,
        "first_audio_alone_ms": alone,
        "first_audio_alone_new_voices_ms": new_voices,
        "playing": playing,
        "arrivals": arrivals,
        "arrivals_first_audio_ms": [first_audio_ms(r) for r in new],
        "arrivals_statuses": [r["status"] for r in new],
        "playing_streams_that_started": sum(1 for r in background if r["chunks"]),
        "largest_gap_while_they_arrive_ms": max(window, default=None),
        "frame_ms": FRAME_MS,
    }


def save(results: dict, acoustic: str) -> None:
    common.save(f"realtime-{results['shape']}" + ("" if acoustic == "remote" else f"-{acoustic}"), results)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--streams", default="192,128", help="stream counts to try, in order")
    p.add_argument("--arrival-s", type=float, default=0.3, help="seconds between two arrivals")
    p.add_argument("--hold-s", type=float, default=20.0, help="seconds measured after the last arrival")
    p.add_argument("--voices", default="2", help="voices per ten-minute stream: one run per count given")
    p.add_argument("--acoustic", default="remote", help="remote: its own process (as `vvmesh up`); local: in the llm")
    p.add_argument("--prefill-chunk", type=int, default=LLMConfig.prefill_chunk, help="the llm's prompt tokens a step")
    p.add_argument("--no-prefill-graphs", action="store_true", help="the llm launches prompt chunks' kernels")
    p.add_argument("--profile", action="store_true", help="the llm profiles its first steps with a prompt chunk")
    p.add_argument("--profile-min-playing", type=int, default=8, help="...once this many streams play")
    p.add_argument("--profile-min-prompt", type=int, default=None, help="...and a prompt this long is prefilled")
    p.add_argument("--profile-steps", type=int, default=None, help="steps the profile records")
    p.add_argument("--no-long", action="store_true", help="skip the 45-minute script cases")
    p.add_argument("--playing", type=int, default=64)
    p.add_argument("--arrivals", type=int, default=8)
    args = p.parse_args()

    path = common.checkpoint(args.shape)
    script = ten_minute_script(path)
    llm = replace(LLMConfig(), allow_fixed_frames=True, prefill_chunk=args.prefill_chunk)
    llm = replace(llm, prefill_graphs=not args.no_prefill_graphs)
    if args.profile:
        llm = replace(
            llm,
            profile_dir=str(common.out_dir() / "llm-profile"),
            profile_min_playing=args.profile_min_playing,
            profile_min_prompt=args.profile_min_prompt,
            profile_steps=args.profile_steps,
        )
    results: dict = {
        "shape": args.shape,
        "configuration": {
            **vars(llm),
            "acoustic": args.acoustic,
            "through": "Envoy",
            "jobs service": "not started",
        },
        "ten_minute_script_prompt_tokens": len(common.prompt_ids(path, script)),
        "arrival_s": args.arrival_s,
        "hold_s": args.hold_s,
    }
    print(results, flush=True)
    mesh = Mesh(
        ports=Ports.free(),
        model=str(path),
        device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32",
        acoustic=args.acoustic,
        llm_config=llm,
        jobs=False,  # live streams only
        log_dir=common.out_dir() / f"logs-realtime-{args.acoustic}",
    )
    t = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(CLIENT_PROCESSES) as pool, mesh:
        results["startup_s"] = time.perf_counter() - t
        address = f"127.0.0.1:{mesh.ports.envoy}"
        run_streams(pool, address, [(synthesize(script, 2, 4, 0), time.monotonic(), time.monotonic() + 120, "warm")])
        results["concurrency"] = []
        for n in [int(s) for s in args.streams.split(",")]:
            for voices in [int(v) for v in args.voices.split(",")]:
                row = concurrency_run(pool, address, script, n, args.arrival_s, args.hold_s, voices)
                results["concurrency"].append(row)
                print(row, flush=True)
                save(results, args.acoustic)  # each row as it comes: a long run cut short keeps what it measured
                time.sleep(3.0)  # the cancelled streams leave
        if not args.no_long:
            results["long_script"] = long_script_run(pool, address, script, args.playing, args.arrivals)
            print(results["long_script"], flush=True)
    save(results, args.acoustic)


if __name__ == "__main__":
    main()

"""A new voice's encoding: the acoustic service's time for voices it has not seen, by the length of a pass.

    python bench/voice_encode.py --shape 1.5b --pass-frames 10,50,150

A request whose voices the acoustic service has not encoded before waits for them before its prompt can start
(the 45-minute demo script has four voices of 9 to 28 s). The service's σ-VAE encoder takes a voice in passes
through its streaming cache (`AcousticEngine.voice_chunk_samples`), so that its kernels stay short beside the
frames being rendered. This times the four demo voices, its cache emptied before each run, at each pass length
given, beside the whole voice in one pass (what transformers' processor and `generate()` do) in the same run,
and prints each length's largest difference from the whole-voice embeddings. The encoder runs alone here; in the
service it runs on a low-priority CUDA stream beside the render steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import soundfile
import torch
from realtime_bench import VOICES  # the demo's four English voices

from services.acoustic.engine import VOICE_CHUNK_SAMPLES, AcousticEngine
from services.common.checkpoint import resolve_checkpoint
from services.common.frames import SAMPLE_RATE, SAMPLES_PER_FRAME


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_encode(engine: AcousticEngine, voices: list[torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Median ms to encode `voices` from an empty cache, and their embeddings."""
    times = []
    for _ in range(repeats):
        engine._voice_means.clear()
        sync()
        t = time.perf_counter()
        embeddings, _ = engine.encode_voices(voices, seed=1)
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), embeddings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.5b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pass-frames", default="10,50,150", help="frames of audio a pass of the encoder takes")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ckpt = resolve_checkpoint(str(common.checkpoint(args.shape)))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    engine = AcousticEngine(ckpt, args.device, dtype, 1, False, False)  # the encoder is eager in the service too
    voices = [torch.from_numpy(soundfile.read(path, dtype="float32")[0]) for path in VOICES]
    longest = max(v.numel() for v in voices)
    results: dict = {
        "shape": args.shape,
        "device": args.device,
        "dtype": str(dtype),
        "voices_seconds": [round(v.numel() / SAMPLE_RATE, 1) for v in voices],
        "service_pass_frames": VOICE_CHUNK_SAMPLES // SAMPLES_PER_FRAME,
        "rows": [],
    }
    timed_encode(engine, voices, 1)  # warm-up: kernels loaded, allocator grown

    engine.voice_chunk_samples = -(-longest // SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
    whole_ms, whole = timed_encode(engine, voices, args.repeats)
    results["whole_voice_ms"] = whole_ms
    for frames in [int(f) for f in args.pass_frames.split(",")]:
        engine.voice_chunk_samples = frames * SAMPLES_PER_FRAME
        ms, embeddings = timed_encode(engine, voices, args.repeats)
        row = {
            "pass_frames": frames,
            "ms": ms,
            "vs_whole_voice": ms / whole_ms,
            "max_difference": float((embeddings - whole).abs().max()),
            "peak": float(whole.abs().max()),
        }
        results["rows"].append(row)
        print(row, flush=True)
    common.save(f"voice-encode-{args.shape}", results)


if __name__ == "__main__":
    main()

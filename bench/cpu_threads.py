"""Torch threads for a CPU mesh: the split `vvmesh up` gives (services/mesh.py cpu_threads) against a thread per
core in every service, the torch default, measured in the same run. Each mesh makes one stream of FRAMES frames,
then three at once, through Envoy, with the tiny model.

    python bench/cpu_threads.py

Prints the times and their ratio; writes bench/results/cpu-threads.json (or $OUT/cpu-threads.json).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

from vibevoice.tts.v1 import tts_pb2

from services.client import build_request, synthesize
from services.mesh import Mesh, Ports

FRAMES = 100
SCRIPT = "Speaker 1: Hello there, and welcome to the show."


def timed(address: str, streams: int) -> float:
    def one(seed: int) -> None:
        request = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=FRAMES, seed=seed)
        synthesize(address, request, timeout=600)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run(threads_per_service: int | None) -> dict[str, float]:
    """A mesh with the default split (None), or every service at `threads_per_service`."""
    env = {} if threads_per_service is None else {"OMP_NUM_THREADS": str(threads_per_service)}
    services = ("text_parser", "acoustic", "llm", "gateway", "jobs")
    mesh = Mesh(
        ports=Ports.free(),
        device="cpu",
        dtype="float32",
        allow_fixed_frames=True,
        log_dir=Path(tempfile.mkdtemp(prefix="cpu-threads-")),
        service_env={s: env for s in services},
    )
    with mesh:
        address = f"127.0.0.1:{mesh.ports.envoy}"
        timed(address, 1)  # warm-up
        return {"one_stream_s": timed(address, 1), "three_streams_s": timed(address, 3)}


def main() -> None:
    if os.environ.get("OMP_NUM_THREADS"):
        raise SystemExit("unset OMP_NUM_THREADS: the bench sets it for each mesh")
    cores = os.cpu_count() or 1
    reference = run(cores)
    split = run(None)
    result = {"cores": cores, "frames": FRAMES, "thread_per_core": reference, "split": split}
    result["speedup"] = {k: reference[k] / split[k] for k in split}
    print(f"{cores} cores, tiny model, {FRAMES} frames per stream, fixed_frames, float32 on the CPU")
    for k in split:
        print(f"{k}: a thread per core {reference[k]:.1f} s, split {split[k]:.1f} s ({result['speedup'][k]:.2f}x)")
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "cpu-threads.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

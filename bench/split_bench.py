"""Two GPUs: the llm on one and the acoustic service on the other, over gRPC on loopback, beside the in-process
engine on one GPU in the same run; and two complete meshes, one per GPU, behind one Envoy.

    python bench/split_bench.py --shape 1.5b             # needs two GPUs
    python bench/split_bench.py --shape 1.5b --dry-run   # the processes, their GPUs and the cases; runs nothing

Modes (--modes):
  local        the llm with the acoustic engine in its process, on GPU 0: the in-process engine
  split        the llm on GPU 0, the acoustic service on GPU 1: every step's tensors in the Render messages,
               two halves of the batch pipelined (one renders while the other decodes)
  split-plain  the same with --no-pipelined-steps: the whole batch decodes, then renders
  two-meshes   a complete mesh per GPU (what `vvmesh up` runs on one GPU), one Envoy balancing calls over both
               gateways; reported per GPU

Every mesh is `vvmesh up`'s configuration (the model's context, 256 streams, CUDA graphs of compiled code, the KV
pool from 90% of its GPU) with fixed_frames allowed, each process pinned to its GPU with CUDA_VISIBLE_DEVICES.
Throughput through Envoy as bench/mesh_bench.py measures it, at 1, 16 and 64 streams (per GPU for two-meshes);
time to first audio and the gaps between a playing stream's chunks in the local and split modes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import common
import torch
from mesh_bench import DATA, batch_run, ensure_data, ttfa_run

from services.cli import build_parser, mesh_from_args
from services.mesh import Mesh, Ports, envoy_config

MODES = ("local", "split", "split-plain", "two-meshes")
LATENCY_MODES = ("local", "split")
# The targets for the split mesh against the in-process engine, by streams.
TARGETS = {1: 0.9, 64: 1.3}
HEALTH_CHECK_S = 2.0  # Envoy's health-check interval (envoy/envoy.yaml): a gateway started late is seen after it


def up_mesh(path: Path, device: str, dtype: str, log_dir: Path, *options: str) -> Mesh:
    """The mesh `vvmesh up --model PATH --device D --dtype T --allow-fixed-frames [options]` starts, on free ports,
    with a job store of its own."""
    argv = ["up", "--model", str(path), "--device", device, "--dtype", dtype, "--allow-fixed-frames"]
    mesh = mesh_from_args(build_parser().parse_args([*argv, "--log-dir", str(log_dir), *options]))
    mesh.ports = Ports.free()
    mesh.jobs_config = replace(mesh.jobs_config, data_dir=None)  # a temporary store, removed when it stops
    return mesh


def pinned(mesh: Mesh, gpu: int, **by_service: int) -> Mesh:
    """Every process of `mesh` on `gpu`, those named in `by_service` on theirs."""
    mesh.service_env = {s: {"CUDA_VISIBLE_DEVICES": str(by_service.get(s, gpu))} for s in mesh.services()}
    return mesh


def meshes_for(mode: str, path: Path, device: str, dtype: str, logs: Path) -> list[Mesh]:
    """The meshes a mode runs; the first one's Envoy is where the clients connect."""
    if mode == "local":
        return [pinned(up_mesh(path, device, dtype, logs, "--acoustic", "local"), 0)]
    if mode in ("split", "split-plain"):
        mesh = pinned(up_mesh(path, device, dtype, logs), 0, acoustic=1)
        if mode == "split-plain":
            mesh.llm_config = replace(mesh.llm_config, pipelined_steps=False)
        return [mesh]
    if mode == "two-meshes":
        second = pinned(up_mesh(path, device, dtype, logs / "gpu1"), 1)
        first = pinned(up_mesh(path, device, dtype, logs / "gpu0"), 0)
        first.more_gateways = (second.ports.gateway,)
        return [first, second]
    raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")


def without_envoy(mesh: Mesh) -> list[str]:
    return [s for s in mesh.services() if s != "envoy"]


@contextlib.contextmanager
def running(meshes: list[Mesh]):
    """Start the meshes (only the first with an Envoy, which balances over every gateway); yield its address."""
    try:
        for mesh in meshes[1:]:
            for service in without_envoy(mesh):
                mesh.start_service(service)
        meshes[0].start(timeout_s=1200)
        for mesh in meshes[1:]:
            mesh.wait_ready(timeout_s=1200, services=without_envoy(mesh))
        if len(meshes) > 1:
            time.sleep(2 * HEALTH_CHECK_S)
        yield f"127.0.0.1:{meshes[0].ports.envoy}"
    finally:
        for mesh in meshes:
            mesh.stop()


def describe(mode: str, meshes: list[Mesh]) -> list[str]:
    """What a mode starts: every process with its GPU, and the gateways its Envoy sends calls to."""
    lines = [f"{mode}:"]
    for i, mesh in enumerate(meshes):
        for service in without_envoy(mesh):
            gpu = mesh.service_env[service]["CUDA_VISIBLE_DEVICES"]
            lines.append(f"  mesh {i} {service:<11} GPU {gpu}: {' '.join(mesh.command(service)[2:])}")
    first = meshes[0]
    clusters = envoy_config(first.ports, None, first.more_gateways)["static_resources"]["clusters"]
    (gateway,) = [c for c in clusters if c["name"] == "gateway"]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in gateway["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    lines.append(f"  Envoy :{first.ports.envoy} -> gateways {ports}")
    return lines


def streams_for(mode: str, streams: list[int]) -> list[int]:
    """Streams per run: for two meshes, as many per GPU as the others run in all."""
    return [2 * s for s in streams] if mode == "two-meshes" else streams


def compare(results: dict) -> list[str]:
    """Each mode's frames/s against the in-process engine on one GPU at the same streams; the targets' verdicts."""
    modes = results["modes"]
    if "local" not in modes:
        return []
    local = {r["batch"]: r["frames_per_s"] for r in modes["local"]["rows"]}
    lines = []
    for mode, entry in modes.items():
        # Every mode but `local` uses two GPUs. Two meshes are compared per GPU; a split mesh spans both and is
        # compared whole against one GPU in process: the targets ask what the second GPU adds to one mesh.
        per = 2 if mode == "two-meshes" else 1
        unit = "GPU" if mode == "two-meshes" else "mesh"
        for r in entry["rows"]:
            streams = r["batch"] // per
            if mode == "local" or streams not in local:
                continue
            r["frames_per_s_per_gpu"] = r["frames_per_s"] / 2
            r["vs_in_process"] = r["frames_per_s"] / per / local[streams]
            line = f"{mode:<12} {streams:>3} streams per {unit}: {r['frames_per_s'] / per:8.1f} frames/s per {unit}"
            line += f", {r['vs_in_process']:.2f}x in-process ({local[streams]:.1f})"
            target = TARGETS.get(streams) if mode == "split" else None
            if target is not None:
                r["target"] = target
                line += f"; target {target}x: {'met' if r['vs_in_process'] >= target else 'NOT met'}"
            lines.append(line)
    return lines


def gpu_names() -> list[str]:
    """The machine's GPUs, from nvidia-smi: asking torch would give this process a CUDA context on GPU 0, memory
    that GPU's llm does not plan around."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
    except FileNotFoundError:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def built_checkpoint(shape: str) -> Path:
    """The random-weight checkpoint, built (on the GPU for the full-size shapes) by a child process that exits, so
    that no memory of this process stays on GPU 0 while the meshes run."""
    code = f"import common; common.checkpoint({shape!r})"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent, check=True)
    return common.checkpoint_path(shape)


def merged(path: Path, results: dict) -> dict:
    """`results` with the modes of an earlier run in `path` that this one did not run, if it measured the same
    case on the same GPUs (each mode's entry says when it was measured)."""
    if not path.exists():
        return results
    earlier = json.loads(path.read_text())
    same = ("shape", "device", "dtype", "frames", "gpus")
    if any(earlier.get(k) != results[k] for k in same):
        print(f"not merging {path}: another case or other GPUs", file=sys.stderr)
        return results
    return {**results, "modes": {**earlier.get("modes", {}), **results["modes"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.5b", help="random-weight checkpoint shape (1.5b, 7b, tiny)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="bfloat16 on CUDA")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: the same processes and measurements with --shape tiny, to check the bench itself (no GPU pinning)",
    )
    p.add_argument("--frames", type=int, default=common.FRAMES, help="fixed frames per stream")
    p.add_argument("--streams", default="1,16,64", help="concurrent streams per run (per GPU for two-meshes)")
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    p.add_argument("--skip-latency", action="store_true", help="no time-to-first-audio and gap measurement")
    p.add_argument("--playing", type=int, default=32, help="streams playing while new requests arrive")
    p.add_argument("--dry-run", action="store_true", help="print what each mode starts, on which GPU; run nothing")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other modes of the last results file (same case, same GPUs): run the modes one or two at a "
        "time, back to back on the same machine, where a command may not run long enough for all four",
    )
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    streams = [int(s) for s in args.streams.split(",")]
    for mode in modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    logs = Path(common.out_dir()) / "logs-split"
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.dry_run:
        path = common.checkpoint_path(args.shape)
        for mode in modes:
            meshes = meshes_for(mode, path, args.device, dtype, logs / mode)
            print("\n".join(describe(mode, meshes)))
            print(f"  streams per run: {streams_for(mode, streams)}")
            for mesh in meshes:
                mesh.stop()  # removes the temporary folders that describing the commands made
        return 0
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(
            f"split_bench needs two GPUs (the llm on one, the acoustic service on the other); this machine has "
            f"{torch.cuda.device_count()}. `--dry-run` shows what it would start.",
            file=sys.stderr,
        )
        return 2

    path = built_checkpoint(args.shape)
    ensure_data()
    voice = (DATA / "voice10s.wav").read_bytes()
    results: dict = {
        "shape": args.shape,
        "device": args.device,
        "dtype": dtype,
        "frames": args.frames,
        "gpus": gpu_names(),
        "modes": {},
    }
    for mode in modes:
        meshes = meshes_for(mode, path, args.device, dtype, logs / mode)
        t = time.perf_counter()
        with running(meshes) as address:
            entry: dict = {"startup_s": time.perf_counter() - t}
            entry["rows"] = [asyncio.run(batch_run(address, n, args.frames)) for n in streams_for(mode, streams)]
            if mode in LATENCY_MODES and not args.skip_latency:
                entry["latency"] = asyncio.run(ttfa_run(address, voice, args.playing))
        entry["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results["modes"][mode] = entry
        print(mode, entry, flush=True)
    name = f"split-{args.shape}" + ("" if args.device == "cuda" else f"-{args.device}")
    if args.merge:
        results = merged(Path(common.out_dir()) / f"{name}.json", results)
    lines = compare(results)
    common.save(name, results)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

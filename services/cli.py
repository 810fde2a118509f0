"""`vvmesh`: run the mesh, one service, or a client.

vvmesh up [--model PATH|tiny] [--allow-fixed-frames]     the whole mesh in the foreground (Ctrl-C stops it)
vvmesh serve SERVICE [service options]                   one service: text_parser, acoustic, llm, gateway
vvmesh synth SCRIPT --voice 1=a.wav -o out.wav           synthesize through Envoy with a progress bar
vvmesh demo                                              start the mesh, synthesize a sample, stop
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from pathlib import Path

from services.client import FORMAT_BY_SUFFIX, build_request, estimate_frames, synthesize, write

SERVICES = ("text_parser", "acoustic", "llm", "gateway")
DEMO_SCRIPT = Path(__file__).resolve().parent.parent.parent / "shared/testdata/vibevoice-demo/scripts/2p_short.txt"


def _voices(specs: list[str]) -> dict[int, bytes]:
    voices = {}
    for spec in specs:
        speaker, _, path = spec.partition("=")
        if not speaker.isdigit() or not path:
            raise SystemExit(f"--voice expects SPEAKER=FILE, got {spec!r}")
        voices[int(speaker)] = Path(path).read_bytes()
    return voices


def _synth(args: argparse.Namespace) -> int:
    script = Path(args.script).read_text()
    fixed = args.fixed_frames
    if fixed == "auto":
        fixed = estimate_frames(script)
    request = build_request(
        script,
        _voices(args.voice),
        FORMAT_BY_SUFFIX.get(Path(args.output).suffix.lower(), FORMAT_BY_SUFFIX[".wav"]),
        cfg_scale=args.cfg_scale,
        diffusion_steps=args.steps,
        seed=args.seed,
        fixed_frames=int(fixed) if fixed else None,
    )
    metadata = [("x-api-key", args.api_key)] if args.api_key else None
    result = synthesize(args.address, request, progress=True, metadata=metadata)
    write(result, Path(args.output))
    h, s = result.header, result.summary
    if h.random_weights:
        print("note: the model has RANDOM WEIGHTS (test model): the audio is not speech")
    for w in h.warnings:
        print(f"warning: {w}")
    print(
        f"wrote {args.output}: {s.audio_seconds:.2f} s of audio, "
        f"time to first audio {s.time_to_first_audio_seconds * 1000:.0f} ms, "
        f"real-time factor {s.real_time_factor:.3f} (seed {h.seed})"
    )
    return 0


def _mesh(args: argparse.Namespace):
    from services.mesh import Mesh

    return Mesh(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        allow_fixed_frames=args.allow_fixed_frames,
        acoustic=args.acoustic,
        log_dir=Path(args.log_dir) if args.log_dir else None,
    )


def _up(args: argparse.Namespace) -> int:
    mesh = _mesh(args)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        mesh.start()
        print(f"mesh up: clients connect to 127.0.0.1:{mesh.ports.envoy} (Ctrl-C stops every process)")
        while not stop:
            time.sleep(0.5)
            for name, proc in mesh.processes.items():
                if proc.poll() is not None:
                    print(f"{name} exited with status {proc.returncode}", file=sys.stderr)
                    return 1
    except KeyboardInterrupt:
        pass
    finally:
        mesh.stop()
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.allow_fixed_frames = True
    with _mesh(args) as mesh:
        voices = Path(args.voices)
        synth = argparse.Namespace(
            script=args.script,
            voice=[f"1={voices / 'en-Alice_woman.wav'}", f"2={voices / 'en-Carter_man.wav'}"],
            output=args.output,
            address=f"127.0.0.1:{mesh.ports.envoy}",
            cfg_scale=None,
            steps=None,
            seed=42,
            fixed_frames="auto" if args.model == "tiny" else None,
            api_key=None,
        )
        return _synth(synth)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        from services.loadgen import main as load_main

        return load_main(argv[1:])
    if argv[:1] == ["serve"]:
        if len(argv) < 2 or argv[1] not in SERVICES:
            raise SystemExit(f"usage: vvmesh serve {{{','.join(SERVICES)}}} [options]")
        rest = argv[2:]
        colocated = argv[1] == "llm" and any(
            a == "--acoustic=local" or (a == "local" and rest[i - 1] == "--acoustic") for i, a in enumerate(rest)
        )
        # The llm hosting the acoustic engine is built where both services meet, not inside either.
        module = "services.colocated" if colocated else f"services.{argv[1]}.server"
        importlib.import_module(module).main(rest)
        return 0

    p = argparse.ArgumentParser(
        prog="vvmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def mesh_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="tiny")
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        sp.add_argument(
            "--acoustic",
            default="remote",
            choices=["remote", "local"],
            help="remote: a separate acoustic service; local: hosted inside the llm process",
        )
        sp.add_argument("--log-dir", default=None)

    up = sub.add_parser("up", help="start the whole mesh in the foreground")
    mesh_options(up)
    up.add_argument("--allow-fixed-frames", action="store_true")

    demo = sub.add_parser("demo", help="start the mesh, synthesize a sample script, stop")
    mesh_options(demo)
    demo.add_argument("--script", default=str(DEMO_SCRIPT))
    demo.add_argument("--voices", default=str(DEMO_SCRIPT.parent.parent / "voices"))
    demo.add_argument("-o", "--output", default="out/demo.wav")

    synth = sub.add_parser("synth", help="synthesize a script through the mesh")
    synth.add_argument("script")
    synth.add_argument("--voice", action="append", default=[], metavar="SPEAKER=FILE")
    synth.add_argument("-o", "--output", required=True, help="output file; the suffix picks the format")
    synth.add_argument("--address", default="127.0.0.1:50051")
    synth.add_argument("--cfg-scale", type=float, default=None)
    synth.add_argument("--steps", type=int, default=None)
    synth.add_argument("--seed", type=int, default=None)
    synth.add_argument("--fixed-frames", default=None, help="N, or 'auto' to estimate from the script's length")
    synth.add_argument("--api-key", default=None)

    args = p.parse_args(argv)
    return {"up": _up, "demo": _demo, "synth": _synth}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""`vvmesh`: run the mesh, one service, or a client.

vvmesh up [--model PATH|tiny] [--port-base N] [engine options]   the whole mesh in the foreground (Ctrl-C stops it)
vvmesh serve SERVICE [service options]                   one service: text_parser, acoustic, llm, gateway, jobs
vvmesh synth SCRIPT --voice 1=a.wav -o out.wav           synthesize through Envoy with a progress bar
vvmesh demo                                              start the mesh, synthesize a sample, stop
vvmesh load --clients 16 --duration 30                   a load report
vvmesh job submit|status|watch|list|cancel|download      long-form jobs (see `vvmesh job --help`)
vvmesh plan SCRIPT [--model tiny|PATH] [--max-context N]  the segments a long script is generated in
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import grpc

from services.client import FORMAT_BY_SUFFIX, build_request, estimate_frames, synthesize, write
from services.common.audio_files import ContainerError
from services.common.errors import CheckpointError
from services.mesh import (
    BASE_PORT,
    DEFAULT_JOBS_DATA_DIR,
    AcousticConfig,
    GatewayConfig,
    JobsConfig,
    LLMConfig,
    Mesh,
    Ports,
    sigterm_as_interrupt,
)

SERVICES = ("text_parser", "acoustic", "llm", "gateway", "jobs")
DEMO_SCRIPT = Path(__file__).resolve().parent.parent.parent / "shared/testdata/vibevoice-demo/scripts/2p_short.txt"


class CliError(Exception):
    """A failure the user can act on: printed as one line, no traceback."""

    exit_code = 1


class UsageError(CliError):
    exit_code = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return number


def _port_base(value: str) -> int:
    try:
        Ports.from_base(int(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return int(value)


def _voices(specs: list[str]) -> dict[int, bytes]:
    voices = {}
    for spec in specs:
        speaker, _, path = spec.partition("=")
        if not speaker.isdigit() or not path:
            raise UsageError(f"--voice expects SPEAKER=FILE, got {spec!r}")
        voices[int(speaker)] = Path(path).read_bytes()
    return voices


def fixed_frames(script: str, option: str | None) -> int | None:
    """--fixed-frames N|auto: N, or an estimate from the script's length."""
    if option == "auto":
        return estimate_frames(script)
    if option is not None and not option.isdigit():
        raise UsageError(f"--fixed-frames expects a number or 'auto', got {option!r}")
    return int(option) if option else None


def _synth(args: argparse.Namespace) -> int:
    script = Path(args.script).read_text()
    request = build_request(
        script,
        _voices(args.voice),
        FORMAT_BY_SUFFIX.get(Path(args.output).suffix.lower(), FORMAT_BY_SUFFIX[".wav"]),
        cfg_scale=args.cfg_scale,
        diffusion_steps=args.steps,
        seed=args.seed,
        max_audio_seconds=args.max_audio_seconds,
        fixed_frames=fixed_frames(script, args.fixed_frames),
    )
    metadata = [("x-api-key", args.api_key)] if args.api_key else None
    result = synthesize(args.address, request, progress=True, metadata=metadata, timeout=args.timeout)
    h, s = result.header, result.summary
    if h is None or s is None:
        raise CliError(f"the stream from {args.address} ended without its {'header' if h is None else 'summary'}")
    write(result, Path(args.output))
    if h.random_weights:
        print("note: the model has RANDOM WEIGHTS (test model): the audio is not speech")
    for w in h.warnings:
        print(f"warning: {w}")
    print(
        f"wrote {args.output}: {s.audio_seconds:.2f} s of audio ({s.frames} frames, ended by {s.finish_reason}), "
        f"time to first audio {s.time_to_first_audio_seconds * 1000:.0f} ms, "
        f"real-time factor {s.real_time_factor:.3f} (seed {h.seed})"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    # Imported here: the tokenizer and checkpoint code would slow every other command's start.
    from services.common.audio import AudioError
    from services.plan import plan_report
    from services.text_parser.script import ScriptError

    # The plan reads the tokenizer and the context only: the random-weights warning is about audio it never makes.
    logging.getLogger("services.common.checkpoint").setLevel(logging.ERROR)
    if args.max_context is not None and args.max_context < 1:
        raise UsageError(f"--max-context must be at least 1, got {args.max_context}")
    text = Path(args.script).read_text()
    try:
        print(plan_report(text, args.script, args.model, args.max_context, _voices(args.voice)))
    except ScriptError as e:
        raise CliError(f"{e.field}: {e.reason}") from e
    except AudioError as e:
        raise CliError(f"voices: {e}") from e
    return 0


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def mesh_from_args(args: argparse.Namespace) -> Mesh:
    """The Mesh `vvmesh up`/`demo` start: options left out keep the servers' defaults (the config classes')."""
    kernels = _given(cuda_graphs=False if args.no_cuda_graphs else None, compile=False if args.no_compile else None)
    llm = LLMConfig(
        **_given(
            max_streams=args.max_streams,
            max_context=args.max_context,
            gpu_memory_fraction=args.gpu_memory_fraction,
            kv_pages=args.kv_pages,
            prefill_chunk=args.prefill_chunk,
            drain_grace=args.drain_grace,
        ),
        allow_fixed_frames=args.allow_fixed_frames,
        prefill_graphs=not args.no_prefill_graphs,
        **kernels,
    )
    return Mesh(
        ports=Ports.from_base(args.port_base),
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        acoustic=args.acoustic,
        llm_config=llm,
        acoustic_config=AcousticConfig(**_given(max_streams=args.max_streams), **kernels),
        gateway_config=GatewayConfig(**_given(queue_size=args.queue_size, drain_grace=args.drain_grace)),
        # The services run in the checkout: a relative --data-dir means the caller's directory, made absolute.
        jobs_config=JobsConfig(**_given(data_dir=_absolute(getattr(args, "data_dir", None)))),
        log_dir=Path(args.log_dir) if args.log_dir else None,
    )


def _busy_ports(mesh: Mesh) -> list[str]:
    busy = []
    names = ["envoy_admin", *mesh.services()]
    for name in names:
        port = mesh.port(name)
        with socket.socket() as s:
            # SO_REUSEADDR: a closed connection's TIME_WAIT is no obstacle, a listener is.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{port} ({name})")
    return busy


def _start(mesh: Mesh) -> None:
    busy = _busy_ports(mesh)
    if busy:
        raise CliError(f"ports in use: {', '.join(busy)}; pick another --port-base")
    try:
        mesh.start()
    except (RuntimeError, TimeoutError) as e:
        logs = f" (logs in {mesh.log_dir})" if mesh.log_dir else ""
        raise CliError(f"the mesh did not start: {e}{logs}") from e


def _stop(mesh: Mesh) -> bool:
    """Stops every process (a second Ctrl-C or SIGTERM cannot cut this short); True if all exited 0."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    codes = mesh.stop()
    failed = {name: code for name, code in codes.items() if code != 0}
    for name, code in failed.items():
        print(f"{name} exited with status {code} on stop", file=sys.stderr)
    return not failed


def _print_ports(mesh: Mesh) -> None:
    names = [*mesh.services(), "envoy_admin"]
    print(f"mesh up: clients connect to 127.0.0.1:{mesh.ports.envoy} (Ctrl-C stops every process)")
    print("ports: " + ", ".join(f"{name} {mesh.port(name)}" for name in names), flush=True)


def _up(args: argparse.Namespace) -> int:
    mesh = mesh_from_args(args)
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # SIGTERM stops the mesh as Ctrl-C does
    try:
        _start(mesh)
        _print_ports(mesh)
        while True:
            time.sleep(0.5)
            for name, proc in mesh.processes.items():
                if proc.poll() is not None:
                    raise CliError(f"{name} exited with status {proc.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        clean = _stop(mesh)
    return 0 if clean else 1


def _demo(args: argparse.Namespace) -> int:
    args.allow_fixed_frames = True
    mesh = mesh_from_args(args)
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        _start(mesh)
        voices = Path(args.voices)
        synth = [args.script, "-o", args.output, "--address", f"127.0.0.1:{mesh.ports.envoy}", "--seed", "42"]
        synth += ["--voice", f"1={voices / 'en-Alice_woman.wav'}", "--voice", f"2={voices / 'en-Carter_man.wav'}"]
        if args.model == "tiny":  # random weights: a length from the script, so the demo runs as long as its text
            synth += ["--fixed-frames", "auto"]
        return _synth(build_parser().parse_args(["synth", *synth]))
    finally:
        _stop(mesh)


def _mesh_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", default="tiny", help="checkpoint directory (transformers format), or 'tiny'")
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    sp.add_argument(
        "--acoustic",
        default="remote",
        choices=["remote", "local"],
        help="remote: a separate acoustic service; local: hosted inside the llm process",
    )
    defaults = Ports()
    sp.add_argument(
        "--port-base",
        type=_port_base,
        default=BASE_PORT,
        metavar="N",
        help=f"Envoy listens on N, its admin on N+{defaults.envoy_admin - BASE_PORT}, the gateway, text_parser, "
        f"acoustic, llm and jobs on N+{defaults.gateway - BASE_PORT}..N+{defaults.jobs - BASE_PORT} "
        f"(default {BASE_PORT})",
    )
    engine = sp.add_argument_group("engine options (passed to the services that take them)")
    engine.add_argument(
        "--max-streams", type=int, help=f"llm and acoustic: streams decoded together ({LLMConfig.max_streams})"
    )
    engine.add_argument("--max-context", type=int, help="llm: positions per stream (the model's)")
    engine.add_argument(
        "--gpu-memory-fraction",
        type=float,
        help=f"llm: share of GPU memory it plans ({LLMConfig.gpu_memory_fraction})",
    )
    engine.add_argument("--kv-pages", type=int, help="llm: KV pages in its pool (what the memory fraction allows)")
    engine.add_argument(
        "--prefill-chunk", type=int, help=f"llm: prompt tokens prefilled per step ({LLMConfig.prefill_chunk})"
    )
    engine.add_argument(
        "--queue-size", type=int, help=f"gateway: requests that may wait for room ({GatewayConfig.queue_size})"
    )
    engine.add_argument(
        "--drain-grace",
        type=float,
        help=f"llm and gateway: seconds running streams get after SIGTERM ({LLMConfig.drain_grace:g})",
    )
    engine.add_argument("--no-compile", action="store_true", help="llm and acoustic: capture eager kernels")
    engine.add_argument("--no-cuda-graphs", action="store_true", help="llm and acoustic: no CUDA graphs")
    engine.add_argument(
        "--no-prefill-graphs", action="store_true", help="llm: launch prompt chunks' kernels instead of a CUDA graph"
    )
    sp.add_argument("--log-dir", default=None, help="one log file per service (default: this terminal)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vvmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole mesh in the foreground")
    _mesh_options(up)
    up.add_argument(
        "--allow-fixed-frames", action="store_true", help="llm: accept the fixed_frames option (tests, benchmarks)"
    )
    up.add_argument("--data-dir", default=DEFAULT_JOBS_DATA_DIR, help=f"jobs: the job store ({DEFAULT_JOBS_DATA_DIR})")

    demo = sub.add_parser("demo", help="start the mesh, synthesize a sample script, stop")
    _mesh_options(demo)
    demo.add_argument("--script", default=str(DEMO_SCRIPT))
    demo.add_argument("--voices", default=str(DEMO_SCRIPT.parent.parent / "voices"))
    demo.add_argument("-o", "--output", default="out/demo.wav")

    synth = sub.add_parser("synth", help="synthesize a script through the mesh")
    synth.add_argument("script")
    synth.add_argument("--voice", action="append", default=[], metavar="SPEAKER=FILE")
    synth.add_argument("-o", "--output", required=True, help="output file; the suffix picks the format")
    synth.add_argument("--address", default=f"127.0.0.1:{BASE_PORT}")
    synth.add_argument("--cfg-scale", type=float, default=None)
    synth.add_argument("--steps", type=int, default=None)
    synth.add_argument("--seed", type=int, default=None)
    synth.add_argument("--max-audio-seconds", type=float, default=None, help="stop after this much audio")
    synth.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS", help="the call's deadline")
    synth.add_argument(
        "--fixed-frames",
        default=None,
        help="N, or 'auto' to estimate from the script's length (servers started with --allow-fixed-frames)",
    )
    synth.add_argument("--api-key", default=None)

    plan = sub.add_parser("plan", help="print the segments a script is generated in, without generating")
    plan.add_argument("script")
    plan.add_argument("--model", default="tiny", help="checkpoint directory (transformers format), or 'tiny'")
    plan.add_argument("--max-context", type=int, default=None, help="positions per stream (the model's)")
    plan.add_argument("--voice", action="append", default=[], metavar="SPEAKER=FILE")
    return p


def _run(argv: list[str]) -> int:
    if argv[:1] == ["job"]:
        from services.job_client import main as job_main

        return job_main(argv[1:])
    if argv[:1] == ["load"]:
        from services.loadgen import main as load_main

        return load_main(argv[1:])
    if argv[:1] == ["serve"]:
        if len(argv) < 2 or argv[1] not in SERVICES:
            raise UsageError(f"usage: vvmesh serve {{{','.join(SERVICES)}}} [options]")
        rest = argv[2:]
        colocated = argv[1] == "llm" and any(
            a == "--acoustic=local" or (a == "local" and rest[i - 1] == "--acoustic") for i, a in enumerate(rest)
        )
        # The llm hosting the acoustic engine is built where both services meet, not inside either.
        module = "services.colocated" if colocated else f"services.{argv[1]}.server"
        importlib.import_module(module).main(rest)
        return 0
    args = build_parser().parse_args(argv)
    return {"up": _up, "demo": _demo, "synth": _synth, "plan": _plan}[args.command](args)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        name = code.name if code is not None else "UNKNOWN"
        details = (e.details() if hasattr(e, "details") else None) or ""
        print(_one_line(f"error: {name}: {details}" if details else f"error: {name}"), file=sys.stderr)
        return 1
    except CliError as e:
        print(_one_line(f"error: {e}"), file=sys.stderr)
        return e.exit_code
    except (OSError, ContainerError, CheckpointError) as e:
        where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(_one_line(f"error: {where}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`vvmesh` as users run it: one-line errors, the synth options, and a second mesh on its own base port."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from dataclasses import fields
from pathlib import Path

import grpc
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import tts_pb2

from services.cli import build_parser, mesh_from_args
from services.client import build_request, synthesize
from services.common.audio import SAMPLES_PER_FRAME
from services.mesh import BASE_PORT, AcousticConfig, GatewayConfig, LLMConfig, Mesh, Ports, cpu_threads, free_ports
from tests.conftest import SCRIPTS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = SCRIPTS / "2p_short.txt"


def vvmesh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- errors: one line, a status, no traceback ---


def test_empty_script_is_one_invalid_argument_line(envoy_address, tmp_path):
    script = tmp_path / "empty.txt"
    script.write_text("")
    out = tmp_path / "out.wav"
    result = vvmesh("synth", str(script), "-o", str(out), "--address", envoy_address, "--timeout", "120")
    assert one_error_line(result) == "error: INVALID_ARGUMENT: text: script is empty"
    assert not out.exists()


def test_deadline_is_one_deadline_exceeded_line(envoy_address, tmp_path):
    out = tmp_path / "out.wav"
    # 2,000 frames take minutes on a CPU; the deadline ends the call long before.
    args = ["synth", str(SCRIPT), "-o", str(out), "--address", envoy_address, "--fixed-frames", "2000"]
    result = vvmesh(*args, "--timeout", "0.5")
    assert one_error_line(result).startswith("error: DEADLINE_EXCEEDED")
    assert not out.exists()


def test_unreachable_mesh_is_one_unavailable_line(tmp_path):
    [port] = free_ports(1)
    result = vvmesh("synth", str(SCRIPT), "-o", str(tmp_path / "o.wav"), "--address", f"127.0.0.1:{port}")
    assert one_error_line(result).startswith("error: UNAVAILABLE: ")


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["synth", str(SCRIPT)], "the following arguments are required: -o/--output", 2),
        (["synth", "no-such-script.txt", "-o", "x.wav"], "error: no-such-script.txt: No such file or directory", 1),
        (["synth", str(SCRIPT), "-o", "x.wav", "--voice", "alice.wav"], "--voice expects SPEAKER=FILE", 2),
        (["synth", str(SCRIPT), "-o", "x.wav", "--voice", "1=no-such.wav"], "no-such.wav: No such file", 1),
        (["synth", str(SCRIPT), "-o", "x.wav", "--timeout", "0"], "argument --timeout: 0 is not above 0", 2),
        (["synth", str(SCRIPT), "-o", "x.wav", "--fixed-frames", "many"], "--fixed-frames expects a number", 2),
        (["up", "--port-base", "65530"], "outside 1..65535", 2),
        (["frobnicate"], "invalid choice: 'frobnicate'", 2),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, expected, code):
    result = vvmesh(*args)
    assert expected in one_error_line(result)
    assert result.returncode == code


# --- synth options ---


def uncapped_frames(address: str, script: str, seed: int) -> int:
    """Frames the model speaks on its own for this seed (with a 10 s backstop)."""
    request = build_request(script, {}, tts_pb2.AUDIO_FORMAT_PCM16, seed=seed, max_audio_seconds=10.0)
    return synthesize(address, request, timeout=300).summary.frames


def test_max_audio_seconds_limits_the_frames_written(envoy_address, tmp_path):
    # A seed whose random-weight model speaks more than 3 frames when nothing stops it.
    script = SCRIPT.read_text()
    seed = next(s for s in range(1, 40) if uncapped_frames(envoy_address, script, s) > 3)
    out = tmp_path / "short.wav"
    args = ["synth", str(SCRIPT), "-o", str(out), "--address", envoy_address, "--seed", str(seed)]
    # 0.375 s (exact in the option's float32) is 2.8 frames at 7.5 per second: the cap rounds up to 3.
    result = vvmesh(*args, "--max-audio-seconds", "0.375")
    assert result.returncode == 0, result.stderr
    with wave.open(str(out)) as w:
        assert w.getnframes() == 3 * SAMPLES_PER_FRAME
    # The cap ended it, not the model.
    assert "(3 frames, ended by " in result.stdout and "ended by eos" not in result.stdout


def test_fixed_frames_are_written_in_full(envoy_address, tmp_path):
    out = tmp_path / "five.flac"
    result = vvmesh("synth", str(SCRIPT), "-o", str(out), "--address", envoy_address, "--fixed-frames", "5")
    assert result.returncode == 0, result.stderr
    assert sf.info(out).frames == 5 * SAMPLES_PER_FRAME
    assert "(5 frames, ended by fixed_frames)" in result.stdout


# --- the mesh's options reach the services ---


class _Parsed(Exception):
    pass


def server_args(monkeypatch, service: str, argv: list[str]) -> dict:
    """What the service's own parser makes of argv (its main() stops right after parsing)."""
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parsed) as parsed:
            importlib.import_module(f"services.{service}.server").main(argv)
    return vars(parsed.value.args[0])


def as_parsed(config) -> dict:
    """A config in the parser's terms: a field that defaults to True is the parser's --no-<field>."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) and f.default is True:
            out[f"no_{f.name}"] = not value
        else:
            out[f.name] = value
    return out


@pytest.mark.parametrize(
    ("service", "config"), [("llm", LLMConfig), ("acoustic", AcousticConfig), ("gateway", GatewayConfig)]
)
def test_config_defaults_are_the_servers_defaults(monkeypatch, service, config):
    parsed = server_args(monkeypatch, service, [])
    expected = as_parsed(config())
    assert {k: parsed[k] for k in expected} == expected


UP = [
    "up",
    "--port-base",
    "20000",
    "--max-streams",
    "3",
    "--max-context",
    "4096",
    "--gpu-memory-fraction",
    "0.5",
    "--prefill-chunk",
    "256",
    "--queue-size",
    "5",
    "--drain-grace",
    "7",
    "--no-compile",
    "--no-cuda-graphs",
    "--no-prefill-graphs",
    "--allow-fixed-frames",
]


def test_up_options_reach_each_service(monkeypatch):
    mesh = mesh_from_args(build_parser().parse_args(UP))
    assert mesh.ports == Ports(
        envoy=20000, envoy_admin=20001, gateway=20010, text_parser=20011, acoustic=20012, llm=20013, jobs=20014
    )
    llm = server_args(monkeypatch, "llm", mesh.command("llm")[5:])
    assert (llm["port"], llm["acoustic"]) == (20013, "127.0.0.1:20012")
    assert (llm["max_streams"], llm["max_context"], llm["gpu_memory_fraction"]) == (3, 4096, 0.5)
    assert (llm["prefill_chunk"], llm["drain_grace"], llm["allow_fixed_frames"]) == (256, 7.0, True)
    assert llm["no_compile"] and llm["no_cuda_graphs"] and not llm["no_shared_gpu_memory"]
    assert llm["no_prefill_graphs"]
    acoustic = server_args(monkeypatch, "acoustic", mesh.command("acoustic")[5:])
    assert (acoustic["port"], acoustic["max_streams"], acoustic["no_compile"], acoustic["no_cuda_graphs"]) == (
        20012,
        3,
        True,
        True,
    )
    gateway = server_args(monkeypatch, "gateway", mesh.command("gateway")[5:])
    assert (gateway["port"], gateway["queue_size"], gateway["drain_grace"]) == (20010, 5, 7.0)
    assert (gateway["llm"], gateway["text_parser"]) == ("127.0.0.1:20013", "127.0.0.1:20011")


def test_plain_up_keeps_every_default(monkeypatch):
    mesh = mesh_from_args(build_parser().parse_args(["up"]))
    assert mesh.ports == Ports() == Ports.from_base(BASE_PORT)
    assert (mesh.llm_config, mesh.acoustic_config, mesh.gateway_config) == (
        LLMConfig(),
        AcousticConfig(),
        GatewayConfig(),
    )
    assert server_args(monkeypatch, "llm", mesh.command("llm")[5:])["allow_fixed_frames"] is False


def test_mesh_shorthands_and_extra_args_still_apply():
    shared = LLMConfig(prefill_chunk=128)
    mesh = Mesh(llm_config=shared, max_streams=2, allow_fixed_frames=True, llm_args=["--drain-grace", "60"])
    command = mesh.command("llm")
    assert command[-2:] == ["--drain-grace", "60"]
    assert "--allow-fixed-frames" in command and command[command.index("--max-streams") + 1] == "2"
    assert mesh.acoustic_config.max_streams == 2
    assert shared == LLMConfig(prefill_chunk=128)  # the caller's config is left as it was


# --- two meshes on one machine ---


def is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base whose whole layout is free, below the kernel's ephemeral range (where free_ports picks)."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        if all(is_free(p) for p in Ports.from_base(base).as_dict().values()):
            return base
    raise RuntimeError("no free base port")


def test_up_on_taken_ports_is_one_line():
    base = free_base_port()
    ports = Ports.from_base(base)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.llm))
        taken.listen()
        result = vvmesh("up", "--port-base", str(base))
    assert one_error_line(result) == f"error: ports in use: {ports.llm} (llm); pick another --port-base"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def llm_capacity(port: int) -> mesh_pb2.CapacityResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return mesh_pb2_grpc.LLMStub(channel).Capacity(mesh_pb2.CapacityRequest(), timeout=5)


def test_second_mesh_on_its_own_base_port(mesh, envoy_address, tiny_checkpoint, tmp_path):
    base = free_base_port()
    ports = Ports.from_base(base)
    args = ["up", "--model", str(tiny_checkpoint), "--dtype", "float32", "--port-base", str(base)]
    args += ["--max-streams", "3", "--max-context", "4096", "--queue-size", "5", "--allow-fixed-frames"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args, "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    printed: list[str] = []
    try:
        second = f"127.0.0.1:{ports.envoy}"
        # `up` prints its ports once every service is ready; the deadline guards a hang, it measures nothing.
        deadline = time.monotonic() + 600
        while not any(line.startswith("ports: ") for line in printed):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.send_signal(signal.SIGTERM)  # `up` stops its services; then stderr has an end
                proc.wait(120)
                pytest.fail(f"the second mesh did not come up: {printed} {proc.stderr.read()}")
            with contextlib.suppress(queue.Empty):
                printed.append(lines.get(timeout=1))
        assert health(envoy_address) == health_pb2.HealthCheckResponse.SERVING
        assert health(second) == health_pb2.HealthCheckResponse.SERVING
        capacity, first = llm_capacity(ports.llm), llm_capacity(mesh.ports.llm)
        # --max-streams and --max-context reached this llm (it may keep one position as scratch space).
        assert capacity.slots == 3 and 4095 <= capacity.max_positions <= 4096
        assert (first.slots, first.max_positions) != (capacity.slots, capacity.max_positions)
        # Envoy's breaker is sized to what this mesh admits: 3 streams + 5 queued.
        clusters = urllib.request.urlopen(f"http://127.0.0.1:{ports.envoy_admin}/clusters", timeout=5).read()
        assert b"gateway::default_priority::max_requests::8\n" in clusters
        out = tmp_path / "second.wav"
        synth = vvmesh("synth", str(SCRIPT), "-o", str(out), "--address", second, "--fixed-frames", "2")
        assert synth.returncode == 0, synth.stderr
        with wave.open(str(out)) as w:
            assert w.getnframes() == 2 * SAMPLES_PER_FRAME
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr.read()
        assert health(envoy_address) == health_pb2.HealthCheckResponse.SERVING  # the first one is untouched
        stdout = "".join(printed)
        assert f"clients connect to 127.0.0.1:{base}" in stdout
        for name, port in ports.as_dict().items():
            assert f"{name} {port}" in stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_cpu_mesh_splits_the_cores_between_its_model_services(mesh):
    """Each torch process would start a thread per core; the llm and the acoustic service share them instead."""
    cores = os.cpu_count() or 1
    expected = {"llm": max(1, cores // 2), "acoustic": max(1, cores // 2), "gateway": 1, "text_parser": 1}
    for service, threads in expected.items():
        environ = Path(f"/proc/{mesh.processes[service].pid}/environ").read_bytes().split(b"\0")
        assert f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', threads)}".encode() in environ, service
    assert cpu_threads("llm", cores=16, colocated=True) == 16
    assert cpu_threads("acoustic", cores=1) == cpu_threads("jobs", cores=16) == 1

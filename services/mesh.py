"""Starting and stopping the whole mesh on one machine: the four services and Envoy, each its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tiny_model import ensure_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"


@dataclass
class Ports:
    envoy: int = 50051
    envoy_admin: int = 9901
    gateway: int = 50061
    text_parser: int = 50062
    acoustic: int = 50063
    llm: int = 50064


def envoy_config(ports: Ports) -> dict:
    """envoy/envoy.yaml with this mesh's ports."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = ports.envoy_admin
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = ports.envoy
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "gateway":
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports.gateway
    return config


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    return str(candidate) if candidate.exists() else "envoy"


@dataclass
class Mesh:
    ports: Ports = field(default_factory=Ports)
    model: str = "tiny"
    device: str = "cpu"
    dtype: str | None = None
    allow_fixed_frames: bool = False
    acoustic: str = "remote"  # or "local": the llm hosts the acoustic engine
    max_streams: int = 64
    llm_args: list[str] = field(default_factory=list)  # extra llm options, e.g. --max-context
    gateway_args: list[str] = field(default_factory=list)  # extra gateway options, e.g. --queue-size
    acoustic_args: list[str] = field(default_factory=list)  # extra acoustic options, e.g. --no-compile
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _model_args(self) -> list[str]:
        args = ["--model", self.model, "--device", self.device]
        return args + (["--dtype", self.dtype] if self.dtype else [])

    def command(self, service: str) -> list[str]:
        p = self.ports
        serve = [sys.executable, "-m", "services.cli", "serve", service]
        if service == "text_parser":
            return [*serve, "--model", self.model, "--port", str(p.text_parser)]
        if service == "acoustic":
            port = ["--port", str(p.acoustic), "--max-streams", str(self.max_streams)]
            return [*serve, *self._model_args(), *port, *self.acoustic_args]
        if service == "llm":
            acoustic = "local" if self.acoustic == "local" else f"127.0.0.1:{p.acoustic}"
            extra = ["--allow-fixed-frames"] if self.allow_fixed_frames else []
            return [
                *serve,
                *self._model_args(),
                "--port",
                str(p.llm),
                "--acoustic",
                acoustic,
                "--max-streams",
                str(self.max_streams),
                *extra,
                *self.llm_args,
            ]
        if service == "gateway":
            return [
                *serve,
                "--port",
                str(p.gateway),
                "--text-parser",
                f"127.0.0.1:{p.text_parser}",
                "--acoustic",
                f"127.0.0.1:{p.llm if self.acoustic == 'local' else p.acoustic}",
                "--llm",
                f"127.0.0.1:{p.llm}",
                *self.gateway_args,
            ]
        if service == "envoy":
            path = Path(tempfile.mkdtemp(prefix="vvmesh-envoy-")) / "envoy.yaml"
            path.write_text(yaml.safe_dump(envoy_config(p)))
            return [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"]
        raise ValueError(f"unknown service {service!r}")

    def services(self) -> list[str]:
        names = ["text_parser", "llm", "gateway", "envoy"]
        return names if self.acoustic == "local" else ["text_parser", "acoustic", *names[1:]]

    def port(self, service: str) -> int:
        return getattr(self.ports, service)

    def start_service(self, service: str) -> subprocess.Popen:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{service}.log", "ab")  # noqa: SIM115 (owned by the child)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            self.command(service),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env=env,
            start_new_session=True,
        )
        self.processes[service] = proc
        return proc

    def start(self, timeout_s: float = 600.0) -> None:
        if self.model == "tiny":
            self.model = str(ensure_tiny_checkpoint())  # built once, before the services race to it
        for service in self.services():
            self.start_service(service)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 600.0, services: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        for service in services or self.services():
            while not self.is_serving(service):
                proc = self.processes.get(service)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{service} exited with status {proc.returncode} during start-up")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service} not serving after {timeout_s:.0f} s")
                time.sleep(0.2)

    def is_serving(self, service: str) -> bool:
        # Envoy is ready when the gateway answers health checks through it.
        port = self.ports.envoy if service == "envoy" else self.port(service)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            return response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def stop_service(self, service: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        proc = self.processes.pop(service, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> None:
        for service in reversed(list(self.processes)):
            self.stop_service(service, timeout_s=15.0)

    def __enter__(self) -> Mesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

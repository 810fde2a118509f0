"""Starting and stopping the whole mesh on one machine: the five services and Envoy, each its own process."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.memory import MALLOC_ENV

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"


BASE_PORT = 50051


@dataclass
class Ports:
    """Where each process listens; the defaults are the layout that a base port shifts (`from_base`)."""

    envoy: int = BASE_PORT  # what clients connect to
    envoy_admin: int = BASE_PORT + 1
    gateway: int = BASE_PORT + 10
    text_parser: int = BASE_PORT + 11
    acoustic: int = BASE_PORT + 12
    llm: int = BASE_PORT + 13
    jobs: int = BASE_PORT + 14

    @classmethod
    def from_base(cls, base: int) -> Ports:
        """Envoy at `base`, everything else at the default layout's offsets from it."""
        shift = base - BASE_PORT
        ports = cls(**{f.name: getattr(cls(), f.name) + shift for f in fields(cls)})
        if min(ports.as_dict().values()) < 1 or max(ports.as_dict().values()) > 65535:
            raise ValueError(f"base port {base} puts ports outside 1..65535 ({ports})")
        return ports

    @classmethod
    def free(cls) -> Ports:
        """Every process on a port that is free on loopback now (meshes started beside others, in tests)."""
        return cls(*free_ports(len(fields(cls))))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sigterm_as_interrupt(*_) -> None:
    """A SIGTERM handler: stop as Ctrl-C does, so that what is open is closed."""
    raise KeyboardInterrupt


def free_ports(n: int) -> list[int]:
    """n ports that are free on loopback now (the kernel's choice), for meshes started beside others."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _argv(config) -> list[str]:
    """A config dataclass as command-line options: `--field value`; booleans as the flag that changes them."""
    argv: list[str] = []
    for f in fields(config):
        value, flag = getattr(config, f.name), f.name.replace("_", "-")
        if isinstance(value, bool):
            if value != f.default:
                argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


@dataclass
class LLMConfig:
    """`vvmesh serve llm` options, with its defaults (the model options come from the Mesh)."""

    max_streams: int = 256
    max_context: int | None = None  # None: the model's
    gpu_memory_fraction: float = 0.9
    kv_pages: int | None = None  # None: from the memory fraction
    prefill_chunk: int = 512
    prefill_graphs: bool = True  # on a GPU, prompt chunks replay one CUDA graph
    drain_grace: float = 120.0
    allow_fixed_frames: bool = False
    cuda_graphs: bool = True
    compile: bool = True
    shared_gpu_memory: bool = True
    pipelined_steps: bool = True  # over the wire: one half of the batch renders while the other decodes
    profile_dir: str | None = None  # a profile of the first steps with a prompt chunk under load goes here
    profile_min_playing: int | None = None  # the load that starts the profile: streams playing (None: 8)
    profile_min_prompt: int | None = None  # ...and the longest prompt prefilled, in tokens (None: any)
    profile_steps: int | None = None  # steps recorded once it starts (None: 20)

    def argv(self) -> list[str]:
        return _argv(self)


@dataclass
class AcousticConfig:
    """`vvmesh serve acoustic` options, with its defaults."""

    max_streams: int = 256
    cuda_graphs: bool = True
    compile: bool = True

    def argv(self) -> list[str]:
        return _argv(self)


@dataclass
class GatewayConfig:
    """`vvmesh serve gateway` options, with its defaults."""

    queue_size: int = 32
    max_queue_wait: float = 50.0
    drain_grace: float = 120.0

    def argv(self) -> list[str]:
        return _argv(self)


@dataclass
class JobsConfig:
    """`vvmesh serve jobs` options, with its defaults (the service's own defaults are these)."""

    data_dir: str | None = None  # None: the mesh's run directory (the service alone: DEFAULT_JOBS_DATA_DIR)
    max_data_bytes: int = 0  # 0: no quota but the disk's
    max_running: int = 4
    reserve_fraction: float = 0.25
    drain_grace: float = 10.0

    def argv(self) -> list[str]:
        return _argv(self)


DEFAULT_JOBS_DATA_DIR = "out/jobs"
MODEL_SERVICES = ("llm", "acoustic")  # the services whose steps run the model


def cpu_threads(service: str, cores: int | None = None, colocated: bool = False) -> int:
    """Torch threads for a service of a mesh on the CPU: the llm and the acoustic service split the cores, and the
    others, whose torch work is small, take one. Each would otherwise start a thread per core, and on a small
    machine the two model services' threads would take turns on the same cores (bench/cpu_threads.py: on 2 cores
    one stream's frames came 2.35x faster split, three streams' 2.01x). A `colocated` llm runs both models, with
    every core."""
    cores = cores or os.cpu_count() or 1
    if service not in MODEL_SERVICES:
        return 1
    return cores if colocated else max(1, cores // len(MODEL_SERVICES))


def envoy_config(ports: Ports, admitted: int | None = None, more_gateways: tuple[int, ...] = ()) -> dict:
    """envoy/envoy.yaml with this mesh's ports; `admitted` (llm streams + gateway queue) sizes the breaker.
    `more_gateways`: loopback ports of other meshes' gateways that Envoy balances the calls over as well."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = ports.envoy_admin
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = ports.envoy
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "gateway":
            if admitted is not None:
                cluster["circuit_breakers"]["thresholds"][0]["max_requests"] = admitted
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports.gateway
                for port in more_gateways:
                    other = copy.deepcopy(group["lb_endpoints"][0])
                    other["endpoint"]["address"]["socket_address"]["port_value"] = port
                    group["lb_endpoints"].append(other)
        if cluster["name"] == "jobs":
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports.jobs
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
    acoustic: str = "remote"  # or "local": the llm hosts the acoustic engine
    llm_config: LLMConfig = field(default_factory=LLMConfig)
    acoustic_config: AcousticConfig = field(default_factory=AcousticConfig)
    gateway_config: GatewayConfig = field(default_factory=GatewayConfig)
    jobs_config: JobsConfig = field(default_factory=JobsConfig)
    jobs: bool = True  # False: live streams only, no jobs service (its Envoy route answers UNAVAILABLE)
    # Shorthands: when set they override the configs (max_streams for llm and acoustic alike).
    allow_fixed_frames: bool = False
    max_streams: int | None = None
    # Extra options appended after each config's (argparse keeps the last value given).
    llm_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    acoustic_args: list[str] = field(default_factory=list)
    jobs_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    # More environment for a service's process, by service name (e.g. CUDA_VISIBLE_DEVICES: a GPU per service).
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    more_gateways: tuple[int, ...] = ()  # other meshes' gateway ports this mesh's Envoy also sends calls to
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _envoy_tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _jobs_tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _sigterm: object = field(default=None, init=False, repr=False)  # SIGTERM's handler before the mesh opened

    def __post_init__(self) -> None:
        # Copies, so a config shared between meshes is not changed under another one.
        if self.max_streams is not None:
            self.llm_config = replace(self.llm_config, max_streams=self.max_streams)
            self.acoustic_config = replace(self.acoustic_config, max_streams=self.max_streams)
        if self.allow_fixed_frames:
            self.llm_config = replace(self.llm_config, allow_fixed_frames=True)

    def _model_args(self) -> list[str]:
        args = ["--model", self.model, "--device", self.device]
        return args + (["--dtype", self.dtype] if self.dtype else [])

    def command(self, service: str) -> list[str]:
        p = self.ports
        serve = [sys.executable, "-m", "services.cli", "serve", service]
        if service == "text_parser":
            return [*serve, "--model", self.model, "--port", str(p.text_parser)]
        if service == "acoustic":
            port = ["--port", str(p.acoustic)]
            return [*serve, *self._model_args(), *port, *self.acoustic_config.argv(), *self.acoustic_args]
        if service == "llm":
            acoustic = "local" if self.acoustic == "local" else f"127.0.0.1:{p.acoustic}"
            port = ["--port", str(p.llm), "--acoustic", acoustic]
            return [*serve, *self._model_args(), *port, *self.llm_config.argv(), *self.llm_args]
        # The gateway and the jobs service call the other three.
        peers = [
            "--text-parser",
            f"127.0.0.1:{p.text_parser}",
            "--acoustic",
            f"127.0.0.1:{p.llm if self.acoustic == 'local' else p.acoustic}",
            "--llm",
            f"127.0.0.1:{p.llm}",
        ]
        if service == "gateway":
            return [*serve, "--port", str(p.gateway), *peers, *self.gateway_config.argv(), *self.gateway_args]
        if service == "jobs":
            data_dir = [] if self.jobs_config.data_dir else ["--data-dir", self._jobs_dir()]
            return [*serve, "--port", str(p.jobs), *peers, *data_dir, *self.jobs_config.argv(), *self.jobs_args]
        if service == "envoy":
            path = Path(self._envoy_dir()) / "envoy.yaml"
            admitted = (self.llm_config.max_streams + self.gateway_config.queue_size) * (1 + len(self.more_gateways))
            path.write_text(yaml.safe_dump(envoy_config(p, admitted, self.more_gateways)))
            return [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"]
        raise ValueError(f"unknown service {service!r}")

    def services(self) -> list[str]:
        names = ["text_parser", "llm", "gateway", *(["jobs"] if self.jobs else []), "envoy"]
        return names if self.acoustic == "local" else ["text_parser", "acoustic", *names[1:]]

    def port(self, service: str) -> int:
        return getattr(self.ports, service)

    def start_service(self, service: str) -> subprocess.Popen:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{service}.log", "ab")  # noqa: SIM115 (owned by the child)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.service_env.get(service, {}))
        if service != "envoy":
            for name, value in MALLOC_ENV.items():
                env.setdefault(name, value)
            if self.device == "cpu":
                env.setdefault("OMP_NUM_THREADS", str(cpu_threads(service, colocated=self.acoustic == "local")))
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
            # Imported here: it needs torch, which the client commands that import this module never use.
            from services.common.tiny_model import ensure_tiny_checkpoint

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

    def _envoy_dir(self) -> str:
        """One directory for this mesh's Envoy config, removed when the mesh stops."""
        if self._envoy_tmp is None:
            self._envoy_tmp = tempfile.TemporaryDirectory(prefix="vvmesh-envoy-")
        return self._envoy_tmp.name

    def _jobs_dir(self) -> str:
        """The job store of a mesh given no data directory: kept while the mesh runs (a restarted jobs service
        finds its jobs), removed when it stops."""
        if self._jobs_tmp is None:
            self._jobs_tmp = tempfile.TemporaryDirectory(prefix="vvmesh-jobs-")
        return self._jobs_tmp.name

    def stop(self) -> dict[str, int | None]:
        """Stops every process, last started first; their exit statuses (0: a clean drain)."""
        statuses = {service: self.stop_service(service, timeout_s=15.0) for service in reversed(list(self.processes))}
        if self._envoy_tmp is not None:
            self._envoy_tmp.cleanup()
            self._envoy_tmp = None
        if self._jobs_tmp is not None:
            self._jobs_tmp.cleanup()
            self._jobs_tmp = None
        return statuses

    def __enter__(self) -> Mesh:
        # The services run in sessions of their own, so a signal to this process does not reach them: while the
        # mesh is open, SIGTERM (a `timeout`, a job scheduler) stops it as Ctrl-C does instead of leaving them.
        if threading.current_thread() is threading.main_thread():
            # None from signal.signal: a handler not set from Python, which the default stands for here.
            self._sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt) or signal.SIG_DFL
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None

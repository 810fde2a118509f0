"""Shared fixtures: one tiny random-weight checkpoint and one running mesh (real processes, real Envoy)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import jobs_pb2, jobs_pb2_grpc

from services.common.tiny_model import build_tiny_checkpoint
from services.mesh import Mesh, Ports

TESTDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata" / "vibevoice-demo"
SCRIPTS = TESTDATA / "scripts"
VOICES = TESTDATA / "voices"


def new_ports() -> Ports:
    return Ports.free()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def cpu_mesh(checkpoint: Path, tmp_path_factory, name: str, **options) -> Mesh:
    """A mesh of its own beside the session's: free ports, CPU float32, fixed_frames allowed, its logs and job
    store in temporary folders named after `name`; `options` are more of Mesh's fields."""
    mesh = Mesh(
        ports=new_ports(),
        model=str(checkpoint),
        device="cpu",
        dtype="float32",
        allow_fixed_frames=True,
        log_dir=tmp_path_factory.mktemp(f"{name}-logs"),
        **options,
    )
    mesh.jobs_config = replace(mesh.jobs_config, data_dir=str(tmp_path_factory.mktemp(f"{name}-data")))
    return mesh


@contextlib.contextmanager
def acoustic_alone(checkpoint: Path, tmp_path_factory, name: str) -> Iterator[str]:
    """An acoustic service in its own process, CPU float32, for an llm run in the test's process: its address."""
    mesh = cpu_mesh(checkpoint, tmp_path_factory, name)
    try:
        mesh.start_service("acoustic")
        mesh.wait_ready(timeout_s=120, services=["acoustic"])
        yield f"127.0.0.1:{mesh.ports.acoustic}"
    finally:
        mesh.stop()


@pytest.fixture(scope="session")
def mesh(tiny_checkpoint, tmp_path_factory):
    """Every service and Envoy as separate processes on loopback, CPU float32, fixed_frames allowed; its job store
    in a folder of the test run."""
    with cpu_mesh(tiny_checkpoint, tmp_path_factory, "mesh") as m:
        yield m


# The two-row mesh: its llm runs this many streams and its gateway queues this many more.
TWO_ROWS = 2
TWO_ROWS_QUEUE = 2


@pytest.fixture(scope="session")
def two_row_mesh(tiny_checkpoint, tmp_path_factory):
    """A mesh whose llm runs 2 streams and whose gateway queues 2 more, so overload, a job's pause for live calls
    and a full pool are cheap to reach. The resilience and job-interruption tests share it; each starts again
    whatever it stopped."""
    options = {"max_streams": TWO_ROWS, "gateway_args": ["--queue-size", str(TWO_ROWS_QUEUE)]}
    with cpu_mesh(tiny_checkpoint, tmp_path_factory, "two-rows", llm_args=["--drain-grace", "60"], **options) as m:
        yield m


def llm_active(mesh: Mesh) -> int:
    """Streams the mesh's llm holds now."""
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.llm}") as channel:
        return mesh_pb2_grpc.LLMStub(channel).Capacity(mesh_pb2.CapacityRequest(), timeout=10).active


def wait_until_idle(mesh: Mesh, timeout: float = 120.0) -> Mesh:
    """`mesh` once its llm holds no stream: what a test that counts the llm's streams starts from."""
    deadline = time.monotonic() + timeout
    while (active := llm_active(mesh)) != 0:
        assert time.monotonic() < deadline, f"the llm still holds {active} streams"
        time.sleep(0.05)
    return mesh


@pytest.fixture(scope="session")
def envoy_address(mesh) -> str:
    return f"127.0.0.1:{mesh.ports.envoy}"


def cancel_open_jobs(mesh: Mesh, owners: tuple[str, ...]) -> None:
    """Cancel the queued and running jobs of `owners` and wait until the llm holds no stream: a module that shares
    its mesh leaves no job behind to take a row from the tests after it."""
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.envoy}") as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        for owner in owners:
            key = [("x-api-key", owner)]
            for job in stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1000), metadata=key, timeout=30).jobs:
                if job.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING):
                    stub.CancelJob(jobs_pb2.CancelJobRequest(name=job.name), metadata=key, timeout=30)
    wait_until_idle(mesh)

"""Shared fixtures: one tiny random-weight checkpoint and one running mesh (real processes, real Envoy)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

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
    """Every service and Envoy as separate processes on loopback, CPU float32, fixed_frames allowed."""
    m = Mesh(
        ports=new_ports(),
        model=str(tiny_checkpoint),
        device="cpu",
        dtype="float32",
        allow_fixed_frames=True,
        log_dir=tmp_path_factory.mktemp("mesh-logs"),
    )
    with m:
        yield m


@pytest.fixture(scope="session")
def envoy_address(mesh) -> str:
    return f"127.0.0.1:{mesh.ports.envoy}"

"""envoy/envoy.yaml is valid for the real Envoy, and keeps the promises streaming depends on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from services.mesh import ENVOY_CONFIG, Ports, envoy_config


def validate(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    return subprocess.run([binary, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)


def route(config: dict) -> dict:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


def test_envoy_accepts_the_config():
    out = validate(ENVOY_CONFIG)
    assert out.returncode == 0, out.stdout + out.stderr


def test_validation_really_checks(tmp_path):
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    route(config)["no_such_field"] = 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    assert validate(broken).returncode != 0


def test_streaming_safe_settings():
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    r = route(config)
    assert r["timeout"] == "0s"  # no route timeout cutting a 90-minute stream
    assert set(r["retry_policy"]["retry_on"].split(",")) == {"connect-failure", "refused-stream"}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_ports_are_rewritten_for_other_meshes(tmp_path):
    ports = Ports(envoy=41001, envoy_admin=41002, gateway=41003)
    config = envoy_config(ports)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    text = path.read_text()
    assert "41001" in text and "41002" in text and "41003" in text and "50061" not in text
    assert validate(path).returncode == 0

"""envoy/envoy.yaml is valid for the real Envoy, and keeps the promises streaming depends on."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.mesh import ENVOY_CONFIG, Mesh, Ports, envoy_config


def envoy_binary() -> str:
    return shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120
    )


def load() -> dict:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def hcm(config: dict) -> dict:
    listener = next(x for x in config["static_resources"]["listeners"] if x["name"] == "public")
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def routes_to(config: dict, cluster: str) -> list[dict]:
    routes = hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    return [r for r in routes if r.get("route", {}).get("cluster") == cluster]


def route(config: dict) -> dict:
    [to_gateway] = routes_to(config, "gateway")
    return to_gateway["route"]


def http_filter(config: dict, name: str) -> dict:
    return next(f for f in hcm(config)["http_filters"] if f["name"] == name)["typed_config"]


def gateway_cluster(config: dict) -> dict:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == "gateway")


def test_envoy_accepts_the_config():
    out = validate(ENVOY_CONFIG)
    assert out.returncode == 0, out.stdout + out.stderr


def test_validation_really_checks(tmp_path):
    config = load()
    route(config)["no_such_field"] = 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    out = validate(broken)
    assert out.returncode != 0
    assert "no_such_field" in out.stdout + out.stderr


def test_streaming_safe_settings():
    config = load()
    r = route(config)
    assert r["timeout"] == "0s"  # no route timeout cutting a 90-minute stream
    # Envoy keeps no timer of its own from grpc-timeout: the client and the gateway end a call at its
    # deadline (tests/test_resilience.py), and calls without one are still bounded.
    assert "grpc_timeout_header_max" not in r["max_stream_duration"]
    assert r["max_stream_duration"]["max_stream_duration"] == "7200s"
    assert hcm(config)["stream_idle_timeout"] == "60s"
    assert hcm(config)["request_timeout"] == "0s"
    # Only failures that prove the gateway never saw the call are retried.
    assert set(r["retry_policy"]["retry_on"].split(",")) == {"connect-failure", "refused-stream"}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_rate_limit_and_filter_order():
    config = load()
    names = [f["name"] for f in hcm(config)["http_filters"]]
    assert names[-1] == "envoy.filters.http.router"
    assert "envoy.filters.http.local_ratelimit" in names
    rl = http_filter(config, "envoy.filters.http.local_ratelimit")
    assert rl["rate_limited_as_resource_exhausted"] is True
    assert rl["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    keys = [[e["key"] for e in d["entries"]] for d in rl["descriptors"]]
    assert ["api_key"] in keys and ["no_api_key", "remote_address"] in keys and ["remote_address"] in keys
    # One address can still fill the mesh in one burst (keyed clients behind a NAT, the mesh bench).
    address = address_bucket()
    assert address["max_tokens"] >= gateway_cluster(config)["circuit_breakers"]["thresholds"][0]["max_requests"]
    assert address["max_tokens"] >= burst_size()


def test_only_grpc_calls_reach_the_gateway_and_jobs():
    config = load()
    routes = hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    # The Jobs API first (a prefix of its own), then everything else gRPC to the gateway.
    assert routes_to(config, "jobs") == [routes[0]] and routes_to(config, "gateway") == [routes[1]]
    assert routes[0]["match"]["prefix"] == "/vibevoice.tts.v1.Jobs/" and routes[1]["match"]["prefix"] == "/"
    for r in routes[:2]:
        assert "grpc" in r["match"]
        headers = {h["name"]: h["string_match"]["exact"] for h in r["match"]["headers"]}
        assert headers == {":method": "POST", "te": "trailers"}
    assert all(400 <= r["direct_response"]["status"] < 500 for r in routes[2:])
    # Jobs streams (WatchJob) are as long as Synthesize streams, and retried as safely.
    for key in ("timeout", "max_stream_duration", "retry_policy"):
        assert routes[0]["route"][key] == routes[1]["route"][key], key


def test_gateway_cluster_is_guarded():
    cluster = gateway_cluster(load())
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    thresholds = cluster["circuit_breakers"]["thresholds"][0]
    # What the mesh admits: llm --max-streams (64) running + gateway --queue-size (32) waiting.
    assert thresholds["max_requests"] == 64 + 32
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == ""
    # Ejected only for its own failures (resets, refused or cut connections), not for the statuses it
    # answers with (tests/test_resilience.py sends calls that make it answer UNKNOWN).
    od = cluster["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert od["enforcing_consecutive_local_origin_failure"] > 0
    assert od["enforcing_consecutive_5xx"] == od["enforcing_consecutive_gateway_failure"] == 0
    assert od["enforcing_success_rate"] == 0


def test_ports_are_rewritten_for_other_meshes(tmp_path):
    ports = Ports(envoy=41001, envoy_admin=41002, gateway=41003, jobs=41004)
    config = envoy_config(ports)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    text = path.read_text()
    assert "41001" in text and "41002" in text and "41003" in text and "41004" in text
    assert "50061" not in text and "50065" not in text
    assert validate(path).returncode == 0


# --- the rate limit really applies per client: a real Envoy in front of a bare gRPC health server ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def envoy_address(tmp_path_factory):
    backend = grpc.server(futures.ThreadPoolExecutor(16))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), backend)
    gateway = backend.add_insecure_port("127.0.0.1:0")
    backend.start()
    ports = Ports(envoy=free_port(), envoy_admin=free_port(), gateway=gateway)
    path = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config(ports)))
    log = path.with_name("envoy.log").open("wb")
    cmd = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "2", "-l", "warn"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{ports.envoy}"
    try:
        deadline = time.monotonic() + 60
        while calls(address, 1, key="warm-up") != {"OK": 1}:
            assert proc.poll() is None, path.with_name("envoy.log").read_text()
            assert time.monotonic() < deadline, "Envoy did not pass calls to the backend"
            time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        backend.stop(0)


def calls(
    address: str, n: int, key: str | None = None, spoof: bool = False, keys: list[str] | None = None
) -> dict[str, int]:
    """n concurrent Health/Check calls through Envoy; counts of status codes.

    spoof: each call claims a different client address in x-forwarded-for.
    keys: each call's own x-api-key (instead of `key` for all)."""
    keys = keys or [key] * n
    metadata = [[("x-api-key", k)] if k else [] for k in keys]
    if spoof:
        forged = [("x-forwarded-for", f"10.9.{i // 200}.{i % 200 + 1}") for i in range(n)]
        metadata = [[*m, f] for m, f in zip(metadata, forged, strict=True)]
    counts: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        pending = [stub.Check.future(request, timeout=10, metadata=m or None) for m in metadata]
        for f in pending:
            try:
                f.result()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            counts[code] = counts.get(code, 0) + 1
    return counts


def burst_size() -> int:
    rl = http_filter(load(), "envoy.filters.http.local_ratelimit")
    return rl["descriptors"][0]["token_bucket"]["max_tokens"]


def address_bucket() -> dict:
    """The bucket every call from one address shares, keyed or not."""
    rl = http_filter(load(), "envoy.filters.http.local_ratelimit")
    return next(d["token_bucket"] for d in rl["descriptors"] if [e["key"] for e in d["entries"]] == ["remote_address"])


def tokens_per_second(bucket: dict) -> float:
    return bucket["tokens_per_fill"] / float(bucket["fill_interval"].rstrip("s"))


def test_rate_limit_is_per_api_key_else_per_address(envoy_address):
    burst = burst_size()
    flood = calls(envoy_address, burst + 20, key="client-a")
    assert flood.get("RESOURCE_EXHAUSTED", 0) >= 10 and flood.get("OK", 0) >= burst, flood
    # Another key has its own bucket, untouched by client-a's flood.
    assert calls(envoy_address, 10, key="client-b") == {"OK": 10}
    # No key: the caller's address is the client; its bucket is separate from every key's.
    anonymous = calls(envoy_address, burst + 20)
    assert anonymous.get("RESOURCE_EXHAUSTED", 0) >= 10, anonymous
    # A keyed caller from the same address is not limited by the (exhausted) keyless bucket.
    assert calls(envoy_address, 5, key="client-c") == {"OK": 5}
    # A forged x-forwarded-for does not buy a fresh bucket: the address is the connection's peer.
    # (Were it trusted, every call here would have a bucket of its own and pass.)
    forged = calls(envoy_address, 20, spoof=True)
    assert forged.get("RESOURCE_EXHAUSTED", 0) >= 10, forged


def test_rate_limit_headers_are_sent(envoy_address):
    with grpc.insecure_channel(envoy_address) as channel:
        _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(
            health_pb2.HealthCheckRequest(), timeout=10, metadata=[("x-api-key", "client-d")]
        )
    headers = dict(call.initial_metadata())
    assert headers["x-ratelimit-limit"] == str(burst_size())
    assert "x-ratelimit-remaining" in headers


def test_fresh_keys_on_every_call_do_not_escape_the_address_bucket(envoy_address):
    bucket = address_bucket()
    rate = tokens_per_second(bucket)
    time.sleep(bucket["max_tokens"] / rate)  # the tests above drained it: start from a full bucket
    # Twice the address's burst, each call with a key never seen before (its own key bucket is full).
    n = 2 * bucket["max_tokens"]
    t0 = time.perf_counter()
    counts = calls(envoy_address, n, keys=[f"rotating-{i}" for i in range(n)])
    refilled = rate * (time.perf_counter() - t0) + bucket["tokens_per_fill"]
    # What the limiter let through; a few of those may meet the circuit breaker (UNAVAILABLE, flag UO):
    # the address's burst is a little over what the mesh admits at once.
    passed = n - counts.get("RESOURCE_EXHAUSTED", 0)
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, counts
    # Before the address bucket, every one of them passed.
    assert bucket["max_tokens"] <= passed <= bucket["max_tokens"] + refilled, counts


def test_a_mesh_removes_its_envoy_config_when_it_stops():
    mesh = Mesh(ports=Ports.from_base(40_000))
    config = Path(mesh.command("envoy")[2])
    assert config.exists() and Path(mesh.command("envoy")[2]) == config  # a restarted Envoy reuses it
    mesh.stop()
    assert not config.parent.exists()

"""Overload, rate limits, a killed worker, cancellation, deadlines, drain and bad input: real processes,
real Envoy, the tiny model on the CPU. Each test is bounded in time and request count."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.client import build_request, synthesize
from services.loadgen import format_summary, run_load, summarize, write_report
from services.mesh import Mesh
from tests.conftest import SCRIPTS, TWO_ROWS, TWO_ROWS_QUEUE, VOICES, wait_until_idle

SLOTS = TWO_ROWS
QUEUE = TWO_ROWS_QUEUE
SCRIPT = (SCRIPTS / "2p_short.txt").read_text()


@pytest.fixture
def idle_small_mesh(two_row_mesh):
    """The two-row mesh: each test starts with no stream running and Envoy's per-key buckets refilled."""
    mesh = wait_until_idle(two_row_mesh)
    time.sleep(1.0)  # a second of refill for every key's bucket; and nothing queued was about to start
    return wait_until_idle(mesh)


@pytest.fixture
def small_mesh(idle_small_mesh):
    """The two-row mesh, for tests that kill or stop its services: what they stopped runs again after
    them, pass or fail, so the next test finds every service up."""
    mesh = idle_small_mesh
    yield mesh
    for service in mesh.services():
        proc = mesh.processes.get(service)
        if proc is None or proc.poll() is not None:
            mesh.processes.pop(service, None)
            mesh.start_service(service)
    mesh.wait_ready(120)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def capacity(mesh: Mesh) -> mesh_pb2.CapacityResponse:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.llm}") as ch:
        return mesh_pb2_grpc.LLMStub(ch).Capacity(mesh_pb2.CapacityRequest(), timeout=5)


def address(mesh: Mesh) -> str:
    return f"127.0.0.1:{mesh.ports.envoy}"


def test_overload_admits_whole_streams_and_rejects_the_rest_cleanly(idle_small_mesh, tmp_path):
    warm = asyncio.run(run_load(address(idle_small_mesh), clients=1, frames=5, count=2))
    assert all(o.status == "OK" for o in warm)
    services = ("text_parser", "acoustic", "llm", "gateway")
    before = {s: rss_kib(idle_small_mesh.processes[s].pid) for s in services}

    # Offered load: three times the streams the mesh can run, for 15 s.
    outcomes = asyncio.run(run_load(address(idle_small_mesh), clients=3 * SLOTS, frames=15, duration_s=15))
    summary = write_report(outcomes, tmp_path / "load")
    print("\n" + format_summary(summary))

    ok = [o for o in outcomes if o.status == "OK"]
    rejected = [o for o in outcomes if o.status != "OK"]
    assert ok and rejected, summary["by_status"]
    assert set(summary["by_status"]) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
    assert all(o.frames_received == o.frames_expected for o in ok)  # nothing lost, nothing out of order
    assert all(o.retry_hint for o in rejected), [o.message for o in rejected if not o.retry_hint][:3]
    assert all(o.frames_received == 0 for o in rejected)  # rejected up front, never cut mid-stream
    assert (tmp_path / "load" / "load.png").stat().st_size > 0

    time.sleep(1.0)
    after = {s: rss_kib(idle_small_mesh.processes[s].pid) for s in services}
    for s in services:
        assert after[s] <= before[s] * 1.10, (s, before[s], after[s])


def test_rejection_beyond_the_queue_does_not_wait(idle_small_mesh):
    """A request beyond the queue is refused at once, not after a wait for room; its latency is in bench/."""
    long = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=80, seed=1)
    threads = [
        threading.Thread(target=lambda: synthesize_quietly(address(idle_small_mesh), long))
        for _ in range(SLOTS + QUEUE)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while capacity(idle_small_mesh).active < SLOTS and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the queue fills behind them
    with grpc.insecure_channel(address(idle_small_mesh)) as ch:
        t0 = time.perf_counter()
        received = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in tts_pb2_grpc.TextToSpeechStub(ch).Synthesize(long, timeout=30):
                received += 1
        elapsed = time.perf_counter() - t0
        print(f"\nrejected in {elapsed * 1000:.1f} ms")
        # Refused by the full queue, not by a queue wait that timed out, and before any held stream ended.
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{SLOTS} streams running, {QUEUE} queued" in err.value.details(), err.value.details()
        assert "retry after" in err.value.details()
        assert received == 0
        assert all(t.is_alive() for t in threads)
        assert capacity(idle_small_mesh).active == SLOTS
    for t in threads:
        t.join(120)


def synthesize_quietly(addr: str, request) -> None:
    with contextlib.suppress(grpc.RpcError):
        synthesize(addr, request, timeout=120)


def test_one_api_key_over_its_rate_is_limited_while_another_is_served(idle_small_mesh):
    # An unknown format is refused by the gateway before any work, so only Envoy's limiter tells them apart.
    cheap = tts_pb2.SynthesizeRequest(text=SCRIPT, format=99)

    def outcomes(key: str, n: int) -> list[str]:
        out = []
        with grpc.insecure_channel(address(idle_small_mesh)) as ch:
            stub = tts_pb2_grpc.TextToSpeechStub(ch)
            for _ in range(n):
                try:
                    for _ in stub.Synthesize(cheap, metadata=[("x-api-key", key)], timeout=10):
                        pass
                except grpc.RpcError as e:
                    limited = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "local_rate_limited" in e.details()
                    out.append("rate_limited" if limited else e.code().name)
        return out

    t0 = time.perf_counter()
    greedy = outcomes("greedy", 40)
    burst_s = time.perf_counter() - t0
    bucket = envoy_key_bucket()
    assert greedy[:10] == ["INVALID_ARGUMENT"] * 10  # served while its bucket lasted
    refilled = int(bucket["tokens_per_fill"] * burst_s / float(bucket["fill_interval"].rstrip("s")))
    assert greedy.count("rate_limited") >= 40 - bucket["max_tokens"] - refilled - 1
    assert outcomes("polite", 3) == ["INVALID_ARGUMENT"] * 3  # another key is still served


def envoy_key_bucket() -> dict:
    """The per-API-key token bucket in envoy/envoy.yaml."""
    import yaml

    from services.mesh import ENVOY_CONFIG

    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    limiter = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit")
    return next(
        d["token_bucket"] for d in limiter["typed_config"]["descriptors"] if d["entries"][0]["key"] == "api_key"
    )


def test_killed_acoustic_worker_fails_its_streams_and_a_new_one_serves(small_mesh):
    request = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=400, seed=3)
    with grpc.insecure_channel(address(small_mesh)) as ch:
        stream = tts_pb2_grpc.TextToSpeechStub(ch).Synthesize(request, timeout=120)
        chunks = 0
        with pytest.raises(grpc.RpcError) as err:
            for response in stream:
                if response.WhichOneof("event") == "audio":
                    chunks += 1
                    if chunks == 3:
                        small_mesh.processes["acoustic"].send_signal(signal.SIGKILL)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "acoustic" in err.value.details()
    assert small_mesh.is_serving("gateway") and small_mesh.is_serving("llm")

    small_mesh.processes.pop("acoustic").wait()
    small_mesh.start_service("acoustic")
    small_mesh.wait_ready(120, ["acoustic"])
    voice = {1: (VOICES / "en-Carter_man.wav").read_bytes()}
    request = build_request(SCRIPT, voice, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=5, seed=4)
    assert synthesize(address(small_mesh), request, timeout=120).summary.frames == 5

    # SIGTERM while the llm keeps its render stream open, idle: the service exits of itself (0), not killed at
    # the end of its grace; and the llm renders on a new stream to the next one.
    assert small_mesh.stop_service("acoustic", timeout_s=10.0) == 0
    small_mesh.start_service("acoustic")
    small_mesh.wait_ready(120, ["acoustic"])
    assert synthesize(address(small_mesh), request, timeout=120).summary.frames == 5


def wait_for_active(mesh: Mesh, n: int, timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    while capacity(mesh).active != n:
        assert time.perf_counter() - t0 < timeout, f"llm still has {capacity(mesh).active} active streams"
        time.sleep(0.01)
    return time.perf_counter() - t0


def test_an_impossible_request_is_refused_while_others_run_not_after_them(idle_small_mesh):
    """fixed_frames past anything a script's segments hold: refused by the plan once admitted, and admitted beside
    the running streams (its cost is what one stream can hold), not after the mesh has emptied."""
    long = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=80, seed=1)
    running = threading.Thread(target=lambda: synthesize_quietly(address(idle_small_mesh), long))
    running.start()
    wait_for_active(idle_small_mesh, 1)
    impossible = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=2**31, seed=2)
    with pytest.raises(grpc.RpcError) as err:
        synthesize(address(idle_small_mesh), impossible, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("options.fixed_frames"), err.value.details()
    assert running.is_alive()
    running.join(120)


def test_cancel_and_deadline_free_the_slot_within_a_step(idle_small_mesh):
    request = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=500, seed=5)
    with grpc.insecure_channel(address(idle_small_mesh)) as ch:
        stub = tts_pb2_grpc.TextToSpeechStub(ch)
        call = stub.Synthesize(request, timeout=120)
        for response in call:
            if response.WhichOneof("event") == "audio":
                break
        assert capacity(idle_small_mesh).active == 1
        step_ms = capacity(idle_small_mesh).step_ms
        call.cancel()
        freed_s = wait_for_active(idle_small_mesh, 0)
        print(f"\ncancel: slot free after {freed_s * 1000:.0f} ms (a step takes {step_ms:.0f} ms)")
        assert freed_s * 1000 < step_ms + 250  # one step, plus the hops' latency

        with pytest.raises(grpc.RpcError) as err:
            for _ in stub.Synthesize(request, timeout=1.5):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        freed_s = wait_for_active(idle_small_mesh, 0)
        assert freed_s * 1000 < step_ms + 250


@pytest.mark.parametrize("service", ["llm", "gateway"])
def test_sigterm_drains_running_streams_and_refuses_new_ones(small_mesh, service):
    request = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=80, seed=6)
    result: dict = {}

    def run() -> None:
        try:
            result["ok"] = synthesize(address(small_mesh), request, timeout=120)
        except grpc.RpcError as e:
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    wait_for_active(small_mesh, 1)
    proc = small_mesh.processes[service]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert not small_mesh.is_serving(service)  # health says NOT_SERVING (or the port is closed to new calls)
    with pytest.raises(grpc.RpcError) as err:
        synthesize(
            address(small_mesh), build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=3), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    thread.join(120)
    assert "error" not in result, result.get("error")
    assert result["ok"].summary.frames == 80  # the running stream finished
    assert proc.wait(60) == 0


def test_bad_requests_in_a_loop_never_disturb_good_ones(idle_small_mesh):
    rng = np.random.default_rng(7)
    bad = [
        tts_pb2.SynthesizeRequest(text=""),
        tts_pb2.SynthesizeRequest(text="x" * (1 << 20)),  # 1 MB of text on one line
        build_request(SCRIPT, {1: rng.bytes(20000)}, tts_pb2.AUDIO_FORMAT_WAV, fixed_frames=2),
        build_request(SCRIPT, {}, 42, fixed_frames=2),
        build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_WAV, fixed_frames=2, diffusion_steps=0),
    ]
    good = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=3, seed=8)
    with grpc.insecure_channel(address(idle_small_mesh), options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = tts_pb2_grpc.TextToSpeechStub(ch)
        for _ in range(3):
            for req in bad:
                with pytest.raises(grpc.RpcError) as err:
                    for _ in stub.Synthesize(req, timeout=30):
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            frames = [
                r.audio.frame_index
                for r in stub.Synthesize(good, timeout=60)
                if r.WhichOneof("event") == "audio" and r.audio.data
            ]
            assert frames == [0, 1, 2]


def test_load_summary_counts_what_happened():
    from services.loadgen import Outcome

    outcomes = [
        Outcome(0, "OK", False, 3, 3, 0.0, 0.1, [0.1, 0.2, 0.5]),
        Outcome(1, "RESOURCE_EXHAUSTED", True, 3, 0, 0.0, None, ended=0.004),
        Outcome(2, "OK", False, 3, 2, 0.0, 0.3, [0.3, 0.4]),
    ]
    s = summarize(outcomes)
    assert s["by_status"] == {"OK": 2, "RESOURCE_EXHAUSTED": 1}
    assert s["frames_lost"] == 1 and s["rejections_with_retry_hint"] == 1
    assert s["max_gap_ms"] == pytest.approx(300.0)
    assert s["ttfa_ms"]["p50"] == pytest.approx(200.0)
    assert s["rejection_ms"]["p50"] == pytest.approx(4.0)


# --- Envoy in front of the gateway: what reaches the client, and what gets the gateway ejected ---


def envoy_stat(mesh: Mesh, name: str) -> int:
    query = urllib.parse.quote(f"^{name}$".replace(".", r"\."))
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.ports.envoy_admin}/stats?filter={query}", timeout=5) as r:
        for line in r.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    raise KeyError(name)


def http_request(mesh: Mesh, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.ports.envoy, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        conn.close()


SYNTHESIZE = "/vibevoice.tts.v1.TextToSpeech/Synthesize"


def test_plain_http_and_undecodable_calls_do_not_eject_the_gateway(mesh):
    ejected = "cluster.gateway.outlier_detection.ejections_enforced_total"
    before = envoy_stat(mesh, ejected)
    statuses = Counter()
    for i in range(50):
        # A key per request keeps them clear of the keyless bucket, so every one reaches the router.
        headers = {"x-api-key": f"curl-{i}"}
        if i % 2:
            status, _ = http_request(mesh, "GET", "/", None, headers)
        else:
            headers["content-type"] = "application/json"
            status, _ = http_request(mesh, "POST", SYNTHESIZE, b'{"text": "hi"}', headers)
        statuses[status] += 1
    # Real gRPC framing, corrupt protobuf: the gateway answers (trailers-only, an error grpc-status),
    # which Envoy used to count as a gateway 5xx.
    answers = []
    for i in range(10):
        grpc_headers = {"content-type": "application/grpc", "te": "trailers", "x-api-key": f"bad-{i}"}
        status, headers = http_request(mesh, "POST", SYNTHESIZE, b"\0\0\0\0\5hello", grpc_headers)
        answers.append((status, headers.get("grpc-status")))

    result = synthesize(
        address(mesh), build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=2, seed=11), timeout=60
    )
    assert result.summary.frames == 2
    assert envoy_stat(mesh, ejected) == before
    assert envoy_stat(mesh, "cluster.gateway.outlier_detection.ejections_active") == 0
    assert statuses == {415: 50}  # answered by Envoy; the gRPC server would have reset them
    assert all(status == 200 and code not in (None, "0") for status, code in answers), answers


def test_deadline_mid_stream_reaches_the_client_as_deadline_exceeded(mesh):
    request = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=400, seed=12)

    def one(i: int) -> tuple[str, int]:
        frames = 0
        with grpc.insecure_channel(address(mesh)) as ch:
            try:
                call = tts_pb2_grpc.TextToSpeechStub(ch).Synthesize(
                    request, timeout=1.5, metadata=[("x-api-key", f"deadline-{i}")]
                )
                for response in call:
                    frames += response.WhichOneof("event") == "audio"
                return "OK", frames
            except grpc.RpcError as e:
                return e.code().name, frames

    # Four at a time: the race was between Envoy's timer and the client's, not between calls.
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(one, range(20)))
    assert Counter(code for code, _ in outcomes) == {"DEADLINE_EXCEEDED": 20}, outcomes
    assert all(frames > 0 for _, frames in outcomes), outcomes  # every deadline fell mid-stream

    result = synthesize(
        address(mesh), build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=2, seed=13), timeout=60
    )
    assert result.summary.frames == 2


def envoy_access_lines(mesh: Mesh, marker: str, timeout_s: float = 30.0) -> list[str]:
    """The running Envoy's access log lines holding `marker`: Envoy writes its access log every 10 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in (mesh.log_dir / "envoy.log").read_text().splitlines() if marker in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def test_gateway_killed_mid_stream(small_mesh):
    mesh = small_mesh
    request = build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=400, seed=14)
    chunks = 0
    t0 = time.perf_counter()
    key = [("x-api-key", "killed")]  # finds the call's line in Envoy's access log
    with grpc.insecure_channel(address(mesh)) as ch, pytest.raises(grpc.RpcError) as err:
        for response in tts_pb2_grpc.TextToSpeechStub(ch).Synthesize(request, timeout=120, metadata=key):
            if response.WhichOneof("event") == "audio":
                chunks += 1
                if chunks == 3:
                    mesh.processes["gateway"].send_signal(signal.SIGKILL)
    failed_after = time.perf_counter() - t0
    assert chunks == 3  # the stream ended at the kill, it did not play on or hang
    assert failed_after < 30

    mesh.processes.pop("gateway").wait()
    mesh.start_service("gateway")
    mesh.wait_ready(120, ["gateway", "envoy"])
    result = synthesize(
        address(mesh), build_request(SCRIPT, {}, tts_pb2.AUDIO_FORMAT_PCM16, fixed_frames=2, seed=15), timeout=60
    )
    assert result.summary.frames == 2

    code, details = err.value.code(), err.value.details() or ""
    if code == grpc.StatusCode.INTERNAL and "RST_STREAM with error code 2" in details:
        access = envoy_access_lines(mesh, "key=killed")
        # Envoy had forwarded the gateway's response headers, so on the upstream reset (connection
        # termination) router.cc Filter::onUpstreamReset -> onUpstreamAbort -> sendLocalReply reaches
        # DownstreamFilterManager::sendLocalReply's "Prior headers have already been sent" branch, which
        # can only reset: ConnectionManagerImpl::doEndStream resets with LocalReset, which the HTTP/2 codec
        # sends as RST_STREAM INTERNAL_ERROR (2); gRPC reads that as INTERNAL (only REFUSED_STREAM means
        # UNAVAILABLE). No Envoy 1.40 setting ends such a stream with grpc-status trailers instead (tried:
        # the nghttp2 codec, retry_on reset, a Lua filter downstream or upstream, grpc_stats, a
        # local_reply_config mapper, the HTTP/2 stream-error options, reset-related runtime flags: all
        # still code 2). Anything else fails.
        assert any("flags=UC" in line for line in access), access  # Envoy saw the gateway's connection end
        pytest.xfail(
            "Envoy 1.40 resets a stream whose response headers went out with RST_STREAM INTERNAL_ERROR (2) "
            f"when the gateway dies (flags=UC), which gRPC reports as INTERNAL: {details}"
        )
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)

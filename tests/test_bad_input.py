"""Bad requests get INVALID_ARGUMENT naming the field and the reason, while other streams go on."""

from __future__ import annotations

import io
import struct
import threading
import time

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_status import rpc_status
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.client import build_request, synthesize
from services.common.errors import bad_request_fields
from tests.conftest import SCRIPTS, VOICES

GOOD = (SCRIPTS / "2p_short.txt").read_text()
# A script beyond the context is spoken in segments of whole turns: one turn beyond it is refused.
LONG_TURN = "Speaker 1: " + " ".join((SCRIPTS / "4p_climate_45min.txt").read_text().split())
VOICE = (VOICES / "en-Carter_man.wav").read_bytes()


def wav(seconds: float, rate: int = 24000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 220 * t), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_claiming_rate(rate: int, seconds: float = 10.0) -> bytes:
    """A normal 24 kHz WAV whose header then claims another sample rate (bytes 24..27) and byte rate (28..31)."""
    data = bytearray(wav(seconds))
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", (rate * 2) % 2**32)
    return bytes(data)


def request(
    text: str = GOOD,
    voices: dict[int, bytes] | None = None,
    fmt: int = tts_pb2.AUDIO_FORMAT_WAV,
    request_id: str = "",
    **options,
) -> tts_pb2.SynthesizeRequest:
    req = build_request(text, voices or {}, fmt, **{"fixed_frames": 2, "seed": 1, **options})
    req.request_id = request_id
    return req


CASES = {
    "empty script": (request(text=""), "text", "empty"),
    "no speaker line": (request(text="Hello there.\nHow are you?"), "text", "Speaker N"),
    "five speakers": (request(text="\n".join(f"Speaker {i}: hi" for i in range(1, 6))), "text", "at most 4"),
    "voice for a silent speaker": (request(voices={3: VOICE}), "voices[0].speaker", "does not speak"),
    "voice that is not audio": (request(voices={1: np.random.default_rng(0).bytes(5000)}), "voices[0].audio", "not a"),
    "voice longer than 60 s": (request(voices={1: wav(61)}), "voices[0].audio", "60"),
    "voice larger than 10 MB": (
        request(voices={1: b"RIFF" + bytes(10 * 1024 * 1024)}),
        "voices[0].audio",
        "size limit",
    ),
    "unknown output format": (request(fmt=99), "format", "unknown output format"),
    "cfg scale out of range": (request(cfg_scale=0.0), "options.cfg_scale", "out of range"),
    "cfg scale too large": (request(cfg_scale=11.0), "options.cfg_scale", "out of range"),
    "diffusion steps out of range": (request(diffusion_steps=0), "options.diffusion_steps", "out of range"),
    "too many diffusion steps": (request(diffusion_steps=101), "options.diffusion_steps", "out of range"),
    "turn longer than the context": (request(text=LONG_TURN), "text", "turn 1"),
    "fixed frames beyond the context": (request(fixed_frames=100_000), "options.fixed_frames", "room"),
    "voice claiming a 2 GHz sample rate": (
        request(voices={1: wav_claiming_rate(2_000_000_000)}),
        "voices[0].audio",
        "8000 to 192000 Hz",
    ),
    "voice of one sample at 192 kHz": (
        request(voices={1: wav(1 / 192000, rate=192000)}),
        "voices[0].audio",
        "too short",
    ),
    "voice claiming a 4 kHz sample rate": (
        request(voices={1: wav_claiming_rate(4000, seconds=1.0)}),
        "voices[0].audio",
        "8000 to 192000 Hz",
    ),
    "speaker number with thousands of digits": (request(text="Speaker " + "7" * 5000 + ": hi"), "text", "range"),
    "request id with a newline": (request(request_id="abc\ndef"), "request_id", "printable"),
    "request id with an escape sequence": (request(request_id="abc\x1b[2Jdef"), "request_id", "printable"),
    "request id longer than 128 characters": (request(request_id="r" * 129), "request_id", "128"),
}


def call(address: str, req: tts_pb2.SynthesizeRequest) -> grpc.RpcError | None:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        try:
            for _ in tts_pb2_grpc.TextToSpeechStub(ch).Synthesize(req, timeout=60):
                pass
        except grpc.RpcError as e:
            return e
    return None


@pytest.fixture(scope="module")
def running_stream(envoy_address):
    """A long good stream that plays while every bad request is rejected."""
    out = {}
    good = request(fixed_frames=150, seed=5)
    thread = threading.Thread(target=lambda: out.update(result=synthesize(envoy_address, good, timeout=600)))
    thread.start()
    yield out
    thread.join(600)
    result = out["result"]
    assert result.summary.frames == 150
    assert [c.frame_index for c in result.chunks if c.data][:150] == list(range(150))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_invalid_argument(envoy_address, running_stream, case):
    req, field, reason = CASES[case]
    err = call(envoy_address, req)
    assert err is not None, f"{case}: accepted"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.code(), err.details())
    violations = bad_request_fields(rpc_status.from_call(err))
    assert violations and violations[0][0] == field, (case, violations)
    assert reason.lower() in violations[0][1].lower(), (case, violations)


def test_request_id_of_128_printable_characters_is_echoed(envoy_address):
    request_id = "id é/" + "r" * 123
    result = synthesize(envoy_address, request(request_id=request_id), timeout=120)
    assert result.header.request_id == request_id


def test_a_request_id_cannot_forge_a_gateway_log_line(mesh, envoy_address):
    forged = "FORGED-4c1d gateway INFO services.gateway.server: request accepted"
    log_file = mesh.log_dir / "gateway.log"
    offset = log_file.stat().st_size
    # A bad option as well, so the request is refused (and logged) whichever check comes first.
    err = call(envoy_address, request(request_id=f"x\n{forged}", cfg_scale=0.0))
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(rpc_status.from_call(err))[0][0] == "request_id"
    time.sleep(0.2)
    with log_file.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    assert any("FORGED-4c1d" in line for line in lines), "the refusal is logged"
    assert not any(line.startswith("FORGED") for line in lines)


def test_voices_claiming_huge_sample_rates_cost_little(envoy_address):
    voice = wav_claiming_rate(2_000_000_000)
    started = time.monotonic()
    err = call(envoy_address, request(voices={1: voice, 2: voice}))
    elapsed = time.monotonic() - started
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(rpc_status.from_call(err))[0][0] == "voices[0].audio"
    assert elapsed < 2.0, f"{elapsed:.1f} s"


def test_good_request_after_bad_ones_succeeds(envoy_address):
    result = synthesize(envoy_address, request(voices={1: VOICE}, fixed_frames=3), timeout=120)
    assert result.summary.frames == 3

"""Internal services refuse bad input as precisely as the public API: INVALID_ARGUMENT, bounded cost, no traceback."""

from __future__ import annotations

import io
import logging
import math
import struct
import sys
import time
from types import SimpleNamespace

import grpc
import numpy as np
import psutil
import pytest
import soundfile as sf
from google.protobuf.descriptor import FieldDescriptor
from grpc_status import rpc_status
from transformers import AutoTokenizer
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import tts_pb2

from services.common.audio import MAX_VOICE_SECONDS, AudioError, decode_voice
from services.common.checkpoint import resolve_checkpoint
from services.common.errors import bad_request_fields
from services.common.logs import EscapingFormatter, escape
from services.text_parser.prompt import PromptBuilder, SpecialTokens, TokenCache
from services.text_parser.script import MAX_TURNS, parse_text
from services.text_parser.server import MAX_VOICE_FRAMES

GARBAGE = b"\x0a\xff\xff\xff\xff\x0fnot a protobuf message"
BAD_UTF8 = b"\xc3\x28 \xff\xfe"
CONTROL_TOKENS = ["<|endoftext|>", "<|vision_pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>"]


def _field_violation(err: grpc.RpcError) -> tuple[str, str]:
    violations = bad_request_fields(rpc_status.from_call(err))
    assert violations, (err.code(), err.details())
    return violations[0]


@pytest.fixture(scope="module")
def parser(mesh):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.text_parser}") as channel:
        yield mesh_pb2_grpc.TextParserStub(channel)


def parse_error(parser, request: mesh_pb2.ParseRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        parser.Parse(request, timeout=60)
    return info.value


# --- 1. Parse's internal-only inputs -------------------------------------------------------------------


def test_voice_frame_limit_is_the_gateway_voice_limit():
    assert MAX_VOICE_FRAMES == math.ceil(MAX_VOICE_SECONDS * 7.5) == 450


@pytest.mark.parametrize("frames", [451, 10**9, 2**31, 2**32 - 1])
def test_absurd_voice_frames_are_refused_before_building(parser, frames):
    request = mesh_pb2.ParseRequest(text="Speaker 1: hello", voices=[mesh_pb2.VoiceSlot(speaker=1, frames=frames)])
    started = time.monotonic()
    err = parse_error(parser, request)
    assert time.monotonic() - started < 5
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    field, reason = _field_violation(err)
    assert field == "voices[0].frames"
    assert "450" in reason


def test_largest_voice_is_accepted(parser):
    request = mesh_pb2.ParseRequest(text="Speaker 1: hello", voices=[mesh_pb2.VoiceSlot(speaker=1, frames=450)])
    assert len(parser.Parse(request, timeout=60).prompt_ids) > 450


def _turns(*turns: tuple[int, str]) -> mesh_pb2.ScriptTurns:
    return mesh_pb2.ScriptTurns(turns=[mesh_pb2.ScriptTurn(speaker=s, text=t) for s, t in turns])


PARSE_CASES = {
    "no script at all": (mesh_pb2.ParseRequest(), "text", "empty"),
    "turn speaker 2**32 - 1": (
        mesh_pb2.ParseRequest(turns=_turns((2**32 - 1, "hi"))),
        "turns",
        "out of range",
    ),
    "turn speaker 4 with speaker 0": (mesh_pb2.ParseRequest(turns=_turns((0, "a"), (4, "b"))), "turns", "range"),
    "voice for a huge speaker number": (
        mesh_pb2.ParseRequest(turns=_turns((1, "a")), voices=[mesh_pb2.VoiceSlot(speaker=2**32 - 1, frames=3)]),
        "voices[0].speaker",
        "does not speak",
    ),
    "two voices for one speaker": (
        mesh_pb2.ParseRequest(text="Speaker 1: a", voices=[mesh_pb2.VoiceSlot(speaker=1, frames=3)] * 2),
        "voices[1].speaker",
        "more than one",
    ),
    "voice with no frames": (
        mesh_pb2.ParseRequest(text="Speaker 1: a", voices=[mesh_pb2.VoiceSlot(speaker=1, frames=0)]),
        "voices[0].frames",
        "at least 1",
    ),
    "more turns than any context holds": (
        mesh_pb2.ParseRequest(turns=_turns(*[(1, "")] * (MAX_TURNS + 1))),
        "turns",
        f"at most {MAX_TURNS}",
    ),
    "speaker number with thousands of digits": (
        mesh_pb2.ParseRequest(text="Speaker " + "7" * 5000 + ": hi"),
        "text",
        "out of range",
    ),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_bad_parse_input_gets_invalid_argument(parser, case):
    request, field, reason = PARSE_CASES[case]
    err = parse_error(parser, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.code(), err.details())
    got_field, got_reason = _field_violation(err)
    assert got_field == field, (case, got_field, got_reason)
    assert reason.lower() in got_reason.lower(), (case, got_reason)


def test_warnings_are_bounded():
    script = parse_text("Speaker 1: hi\n" + "no speaker here\n" * 10_000)
    assert len(script.warnings) <= 101
    assert "more" in script.warnings[-1]


# --- 2. The token cache is bounded in bytes --------------------------------------------------------------


def test_token_cache_holds_at_most_its_byte_budget():
    cache = TokenCache(budget_bytes=100_000)
    for i in range(200):
        cache.put(f"{i:04d}" + "x" * 1000, tuple(range(100)))
        assert cache.bytes <= 100_000
    assert 0 < len(cache) < 200
    assert cache.get("0000" + "x" * 1000) is None  # the oldest went first
    assert cache.get("0199" + "x" * 1000) == tuple(range(100))


def test_token_cache_evicts_least_recently_used():
    first, second = "a" * 1000, "b" * 1000
    size = TokenCache.cost(first, (1,) * 10)
    cache = TokenCache(budget_bytes=3 * size, max_entry_bytes=size)
    cache.put(first, (1,) * 10)
    cache.put(second, (2,) * 10)
    assert cache.get(first) == (1,) * 10  # first is now the most recently used
    cache.put("c" * 1000, (3,) * 10)
    cache.put("d" * 1000, (4,) * 10)
    assert cache.get(second) is None
    assert cache.get(first) == (1,) * 10


def test_token_cache_skips_a_piece_larger_than_a_share_of_its_budget():
    cache = TokenCache(budget_bytes=100_000)
    cache.put("y" * 90_000, (1,))
    assert len(cache) == 0 and cache.bytes == 0


def _char_tokenizer(text: str, add_special_tokens: bool = False, split_special_tokens: bool = False):
    return SimpleNamespace(input_ids=[ord(c) for c in text])


def test_a_prompt_over_the_limit_leaves_nothing_in_the_cache():
    builder = PromptBuilder(_char_tokenizer, SpecialTokens(1, 2, 3))
    long_script = parse_text("Speaker 1: " + "z" * 5000)
    ids, _ = builder.build(long_script, {}, limit=1000)
    assert len(ids) > 1000
    assert builder.cache.get(" Speaker 0: " + "z" * 5000 + "\n") is None
    builder.build(parse_text("Speaker 1: short"), {}, limit=1000)
    assert builder.cache.get(" Speaker 0: short\n") is not None


def _big_script(rng: np.random.Generator, size: int) -> str:
    """Lines of 400 random words of 2 to 8 letters, up to `size` characters."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    lines, length = [], 0
    while length < size:
        ends = np.cumsum(rng.integers(2, 9, 400))
        chars = rng.choice(letters, ends[-1]).tobytes().decode()
        words = [chars[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        lines.append(f"Speaker {rng.integers(1, 3)}: {' '.join(words)}.")
        length += len(lines[-1]) + 1
    return "\n".join(lines)


def test_many_rejected_big_scripts_do_not_grow_the_text_parser(mesh, parser):
    process = psutil.Process(mesh.processes["text_parser"].pid)
    rng = np.random.default_rng(7)
    scripts = [_big_script(rng, 400_000) for _ in range(41)]
    parse_error(parser, mesh_pb2.ParseRequest(text=scripts[0]))  # the tokenizer's own buffers
    before = process.memory_info().rss
    for script in scripts[1:]:
        err = parse_error(parser, mesh_pb2.ParseRequest(text=script))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field_violation(err)[0] == "text"
    grown = process.memory_info().rss - before
    assert grown < 40 * 2**20, f"text_parser grew by {grown / 2**20:.0f} MiB"


# --- 3. Control tokens in user text are plain text ---------------------------------------------------------


def test_control_tokens_in_the_script_are_plain_text(parser, tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = resolve_checkpoint(str(tiny_checkpoint)).config
    layout = {config.audio_bos_token_id, config.audio_eos_token_id, config.audio_token_id}
    added = set(tokenizer.added_tokens_decoder)
    assert layout <= added
    lines = [f"Speaker 1: before {' and '.join(CONTROL_TOKENS)} after", "Speaker 2: " + "".join(CONTROL_TOKENS)]
    response = parser.Parse(
        mesh_pb2.ParseRequest(text="\n".join(lines), voices=[mesh_pb2.VoiceSlot(speaker=1, frames=3)]),
        timeout=60,
    )
    ids = list(response.prompt_ids)
    assert set(ids) & added <= layout
    assert ids.count(config.audio_token_id) == 3
    assert ids.count(config.audio_bos_token_id) == 2  # the voice prompt's and the speech output's
    assert ids.count(config.audio_eos_token_id) == 1
    assert [t.text for t in response.turns] == [line.split(": ", 1)[1] for line in lines]
    decoded = tokenizer.decode(ids)
    for turn in response.turns:
        assert f" Speaker {turn.speaker}: {turn.text}\n" in decoded


# --- 4. Bytes that are not a request --------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _string_field_path(descriptor, depth: int = 3) -> list | None:
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            return [f]
    if depth > 1:
        for f in descriptor.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                inner = _string_field_path(f.message_type, depth - 1)
                if inner:
                    return [f, *inner]
    return None


def invalid_utf8(message_type) -> bytes | None:
    """The message with invalid UTF-8 in its first string field (nested if need be); None if it has none."""
    path = _string_field_path(message_type.DESCRIPTOR)
    if path is None:
        return None
    data = BAD_UTF8
    for f in reversed(path):
        data = _varint(f.number << 3 | 2) + _varint(len(data)) + data
    return data


METHODS = {
    # name: (service whose log is read, port attribute, method path, request type, streaming kind)
    "gateway via envoy": (
        "gateway",
        "envoy",
        "/vibevoice.tts.v1.TextToSpeech/Synthesize",
        tts_pb2.SynthesizeRequest,
        "us",
    ),
    "gateway": ("gateway", "gateway", "/vibevoice.tts.v1.TextToSpeech/Synthesize", tts_pb2.SynthesizeRequest, "us"),
    "text_parser": ("text_parser", "text_parser", "/vibevoice.mesh.v1.TextParser/Parse", mesh_pb2.ParseRequest, "uu"),
    "acoustic encode": (
        "acoustic",
        "acoustic",
        "/vibevoice.mesh.v1.Acoustic/EncodeVoice",
        mesh_pb2.EncodeVoiceRequest,
        "uu",
    ),
    "acoustic render": ("acoustic", "acoustic", "/vibevoice.mesh.v1.Acoustic/Render", mesh_pb2.RenderRequest, "ss"),
    "acoustic embed frames": (
        "acoustic",
        "acoustic",
        "/vibevoice.mesh.v1.Acoustic/EmbedFrames",
        mesh_pb2.EmbedFramesRequest,
        "uu",
    ),
    "acoustic stream audio": (
        "acoustic",
        "acoustic",
        "/vibevoice.mesh.v1.Acoustic/StreamAudio",
        mesh_pb2.StreamAudioRequest,
        "us",
    ),
    "llm generate": ("llm", "llm", "/vibevoice.mesh.v1.LLM/Generate", mesh_pb2.GenerateRequest, "us"),
    "llm capacity": ("llm", "llm", "/vibevoice.mesh.v1.LLM/Capacity", mesh_pb2.CapacityRequest, "uu"),
}


def _send_raw(address: str, method: str, kind: str, data: bytes) -> grpc.RpcError:
    identity = {"request_serializer": None, "response_deserializer": None}
    with grpc.insecure_channel(address) as channel:
        try:
            if kind == "uu":
                channel.unary_unary(method, **identity)(data, timeout=30)
            elif kind == "us":
                list(channel.unary_stream(method, **identity)(data, timeout=30))
            else:
                list(channel.stream_stream(method, **identity)(iter([data]), timeout=30))
        except grpc.RpcError as e:
            return e
    raise AssertionError(f"{method} accepted {data!r}")


@pytest.mark.parametrize("payload", ["garbage", "invalid utf-8"])
@pytest.mark.parametrize("name", list(METHODS))
def test_bytes_that_are_not_a_request_get_invalid_argument(mesh, name, payload):
    service, port, method, message_type, kind = METHODS[name]
    data = GARBAGE if payload == "garbage" else invalid_utf8(message_type)
    if data is None:
        pytest.skip(f"{message_type.DESCRIPTOR.full_name} has no string field")
    with pytest.raises(Exception):  # noqa: B017 (any parse error: the bytes really are not this message)
        message_type.FromString(data)
    log_file = mesh.log_dir / f"{service}.log"
    offset = log_file.stat().st_size
    err = _send_raw(f"127.0.0.1:{getattr(mesh.ports, port)}", method, kind, data)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
    field, reason = _field_violation(err)
    assert field == "request"
    assert message_type.DESCRIPTOR.full_name in reason
    time.sleep(0.2)  # let the service flush its log
    with log_file.open("rb") as f:
        f.seek(offset)
        assert b"Traceback" not in f.read()


def test_services_still_work_after_bad_bytes(mesh, parser):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.llm}") as channel:
        assert mesh_pb2_grpc.LLMStub(channel).Capacity(mesh_pb2.CapacityRequest(), timeout=30).slots >= 0
    assert parser.Parse(mesh_pb2.ParseRequest(text="Speaker 1: hi"), timeout=30).prompt_ids


# --- 5. Client strings cannot forge log lines -------------------------------------------------------------


def test_escape_keeps_one_line():
    assert escape("plain text, unicode é") == "plain text, unicode é"
    assert escape("a\nb\rc\x1b[31md\u2028e") == "a\\nb\\rc\\x1b[31md\\u2028e"


def test_formatter_escapes_message_but_keeps_tracebacks():
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "request %s: %s", ("id\nFORGED", "bad\r\n"), None)
    assert formatter.format(record) == "INFO request id\\nFORGED: bad\\r\\n"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "\nTraceback" in formatter.format(record)


# --- 6. Voice sample rates ---------------------------------------------------------------------------------


def wav_claiming_rate(rate: int, seconds: float = 10.0) -> bytes:
    """A normal 24 kHz 16-bit mono WAV whose header then claims another sample rate (and byte rate)."""
    buf = io.BytesIO()
    samples = np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * 24000))
    sf.write(buf, samples, 24000, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", (rate * 2) % 2**32)
    return bytes(data)


@pytest.mark.parametrize("rate", [2_000_000_000, 192_001, 7_999, 1])
def test_voice_rate_outside_8_to_192_khz_is_refused_quickly(rate):
    started = time.monotonic()
    with pytest.raises(AudioError, match="8000 to 192000 Hz"):
        decode_voice(wav_claiming_rate(rate, seconds=1.0 if rate < 8000 else 10.0))
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("rate", [8000, 192_000])
def test_voice_rates_at_the_bounds_are_accepted(rate):
    assert len(decode_voice(wav_claiming_rate(rate, seconds=1.0))) > 0

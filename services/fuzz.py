"""`python -m services.fuzz`: a bounded request fuzzer for the public Synthesize API, through Envoy.

It sends N requests built from valid seeds (the demo scripts and voices, every output format, options) and
mutated: option values at and past their limits, odd text and request ids, turns, speaker numbers, voice
bytes (truncated, garbage, bit-flipped, WAV headers with absurd fields), byte-level damage to the
serialized request, and odd x-api-key metadata. One seeded random.Random builds every request, so a run is
reproducible. Every request stays cheap: voices of a few seconds, and fixed_frames small (or past the
context, where it is refused) on anything that could reach the model, because a random-weight model only
stops where fixed_frames tells it to.

Calls go out a few at a time (threads), paced to 75 % of the lowest per-client rate in Envoy's local rate
limit (envoy/envoy.yaml), so the fuzz measures the mesh and not the limiter; most carry one of a fixed set
of x-api-key values, which keeps Envoy's table of per-key buckets (and its memory) bounded.

Requirements checked (Report.problems):
  * no call ends INTERNAL or UNKNOWN, or with any code outside OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
    DEADLINE_EXCEEDED, and UNAVAILABLE where the fuzzer knows why (a request whose headers Envoy refuses);
    an OK stream must hold one header first and one summary last and echo the request id;
  * no service process exits;
  * every process's RSS (the four services and Envoy) comes back within 10 % of its value after a warm-up, plus
    what its bounded caches may hold (the gateway's decoded voices: the fuzz's mutated voices are many distinct
    files, each kept until the cache's bound pushes it out);
  * good streams (fixed seed and fixed_frames, with a voice) played one after another during the fuzz equal
    the same request played alone before it: bit-identical when they ran alone, and within GOOD_TOLERANCE of
    its peak when they shared a batch (on the CPU a matmul's rounding depends on the batch's shape; a wrong
    row or a stale state differs by order one).
Allowed answers that are still wrong (an INVALID_ARGUMENT naming a field the public request does not have)
are reported as observations. Each failure and observation is shrunk to a small request that still fails
the same way and printed as a reproducer; `--replay HEX --address ...` sends one again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import random
import re
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import soundfile as sf
import soxr
import yaml
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from grpc_status import rpc_status
from vibevoice.tts.v1 import tts_pb2

from services.common.errors import bad_request_fields
from services.common.grpc_server import CHANNEL_OPTIONS
from services.synthesis import voice_cache

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = ROOT.parent / "shared" / "testdata" / "vibevoice-demo"
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"
METHOD = "/vibevoice.tts.v1.TextToSpeech/Synthesize"

ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
RSS_TOLERANCE = 0.10
BOUNDED_CACHE_BYTES = {"gateway": voice_cache.CACHE_BYTES}  # RSS a service may grow by, filling them
CONTEXT = 8192  # the tiny model's
# fixed_frames are shared out over a script's turns by words (a script beyond the context runs in segments), so
# only this many are always refused: a script has at most 2**18 words (512 KB), and even a turn of one word
# would get a context's worth of frames.
ALWAYS_REFUSED_FRAMES = 2**31
MAX_FUZZ_FRAMES = 3  # fixed_frames on requests that may be accepted
# Envoy's default max_request_headers_kb: beyond it Envoy drops the whole connection (GOAWAY).
ENVOY_MAX_HEADERS = 60 * 1024
# The good stream: long enough to overlap many fuzz calls, sent again and again while the fuzz runs.
GOOD_FRAMES = 40
GOOD_SEED = 424242
GOOD_GAP_S = 1.0  # between good streams: they overlap the fuzz without taking a whole core from it
GOOD_TOLERANCE = 1e-5  # of the peak: the bound the batch tests hold every stream to (tests/test_engine.py)

CFG_SCALES = [0.0, -0.0, -1.0, 1e-45, 1e-38, 1e-3, 9.999999, 10.0, 10.000001, 10.5, 11.0, 1e38, 3.4028235e38,
              math.nan, -math.nan, math.inf, -math.inf]  # fmt: skip
DIFFUSION_STEPS = [0, 1, 2, 99, 100, 101, 1000, 2**31 - 1, 2**31, 2**32 - 1]
SEEDS = [0, 1, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
MAX_AUDIO_SECONDS = [math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-45, 1e-10, 0.01, 0.1, 1.0, 60.0, 1e6, 3.4e38]
FIXED_FRAMES = [0, 1, 2, CONTEXT - 1, CONTEXT, CONTEXT + 1, 10**5, 2**31, 2**32 - 1]
FORMATS = [0, 1, 2, 3, 4, 5]
BAD_FORMATS = [-1, -(2**31), 6, 7, 99, 2**31 - 1]
SPEAKERS = [0, 1, 2, 3, 4, 5, 9, 2**31, 2**32 - 1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<think>", "</think>", "<tool_call>", "<|fim_pad|>",
                  "<|endoftext|", "<|", "|>"]  # fmt: skip
CONTROL_CHARS = [chr(c) for c in range(32)] + ["\x7f", "\x85", "\u2028", "\u2029", "\r\n", "\x1b[31m"]
UNICODE_SAMPLES = ["é", "ß", "中文", "日本語", "한국어", "١٢٣", "😀", "👩‍👩‍👧", "\u202e", "\u200b", "\u200d", "\ufeff",
                   "\ufffd", "\uffff", "\U0010ffff", "e\u0301\u0301\u0301", "\u0000", "Ω" * 50, "𝕊𝕡𝕖𝕒𝕜𝕖𝕣"]  # fmt: skip
SPEAKER_PREFIXES = ["Speaker 0:", "Speaker 1:", "Speaker 4:", "Speaker 5:", "speaker 2 :", "SPEAKER   3:",
                    "Speaker 99999999999999999999:", "Speaker -1:", "Speaker ١:", "Speaker 1", "Speaker:",
                    "Speaker 1::", "Speaker 01:", "Speaker 1:\t", " Speaker 2:"]  # fmt: skip
REQUEST_IDS = ["", " ", "\n", "a\nb", "\r\n", "id\x00zero", "\t", "é", "😀" * 10, "<|endoftext|>", "%s%n",
               "../../etc/passwd", "a" * 256, "a\r\nX-Injected: 1"]  # fmt: skip


# --- seeds ---------------------------------------------------------------------------------------------


def _encode_audio(samples: np.ndarray, rate: int, container: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=container, subtype=subtype)
    return buf.getvalue()


@dataclass
class Seeds:
    scripts: dict[str, str]  # the short demo scripts, whole
    long_scripts: dict[str, str]  # the long ones: refused (context) or slow, sent rarely
    voices: list[bytes]  # 1-2.5 s clips in WAV/FLAC/Ogg/MP3, various rates and channel counts
    tiny_voices: list[bytes]  # 0.2 s clips, for requests with many voices

    @classmethod
    def load(cls, testdata: Path = TESTDATA, seed: int = 0) -> Seeds:
        rng = random.Random(seed)
        scripts, long_scripts = {}, {}
        for path in sorted((testdata / "scripts").glob("*.txt")):
            text = path.read_text()
            (scripts if len(text) < 5000 else long_scripts)[path.stem] = text
        encodings = [
            ("WAV", "PCM_16", 24000, 1),
            ("WAV", "FLOAT", 24000, 1),
            ("WAV", "PCM_16", 16000, 2),
            ("WAV", "PCM_U8", 8000, 1),
            ("FLAC", "PCM_16", 24000, 1),
            ("FLAC", "PCM_24", 44100, 2),
            ("OGG", "VORBIS", 24000, 1),
            ("OGG", "OPUS", 48000, 1),
            ("MP3", "MPEG_LAYER_III", 44100, 2),
            ("MP3", "MPEG_LAYER_III", 16000, 1),
        ]
        voices, tiny = [], []
        for i, path in enumerate(sorted((testdata / "voices").glob("*.wav"))):
            audio, rate = sf.read(path, dtype="float32", always_2d=False)
            for j, (container, subtype, out_rate, channels) in enumerate(encodings):
                if (i + j) % 2:  # half of the combinations: enough variety, half the set-up time
                    continue
                seconds = rng.uniform(1.0, 2.5)
                start = rng.randrange(0, max(1, len(audio) - int(seconds * rate)))
                clip = audio[start : start + int(seconds * rate)]
                if out_rate != rate:
                    clip = soxr.resample(clip, rate, out_rate)
                if channels == 2:
                    clip = np.stack([clip, np.roll(clip, 7) * 0.8], axis=1)
                voices.append(_encode_audio(clip, out_rate, container, subtype))
            tiny.append(_encode_audio(audio[: rate // 5], rate, "WAV", "PCM_16"))
        return cls(scripts, long_scripts, voices, tiny)

    def good_request(self) -> tts_pb2.SynthesizeRequest:
        """The request the good streams repeat: a fixed seed and fixed_frames, a voice; the model's float32
        samples, so a difference is seen at its true size."""
        return tts_pb2.SynthesizeRequest(
            request_id="fuzz-good",
            text=self.scripts.get("2p_short") or next(iter(self.scripts.values())),
            voices=[tts_pb2.VoicePrompt(speaker=1, audio=self.voices[0])],
            format=tts_pb2.AUDIO_FORMAT_PCM_F32,
            options=tts_pb2.GenerationOptions(seed=GOOD_SEED, fixed_frames=GOOD_FRAMES, cfg_scale=1.3),
        )


def _speakers_in(text: str) -> list[int]:
    """The speaker numbers a text script names, as a VoicePrompt can carry them: one past uint32 (the text's own
    hostile case) becomes the largest."""
    found = re.findall(r"^\s*Speaker\s+(\d+)\s*:", text, re.IGNORECASE | re.MULTILINE)
    return sorted({min(int(m), 2**32 - 1) for m in found})


def _turns_of(text: str) -> list[tuple[int, str]]:
    """A text script's turns as Turn fields: a speaker number past uint32 (the text's own hostile case) becomes
    the largest a Turn can carry."""
    return [
        (min(int(m.group(1)), 2**32 - 1), m.group(2))
        for line in text.splitlines()
        if (m := re.match(r"^\s*Speaker\s+(\d+)\s*:\s*(.*)$", line, re.IGNORECASE))
    ]


# --- protobuf wire format ------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _read_varint(data: bytes, at: int) -> tuple[int, int] | None:
    value = shift = 0
    while at < len(data) and shift < 70:
        b = data[at]
        value |= (b & 0x7F) << shift
        at += 1
        if not b & 0x80:
            return value, at
        shift += 7
    return None


def _wire_fields(payload: bytes) -> list[bytes] | None:
    """The payload cut into its top-level fields (group markers on their own), or None where it cannot be."""
    out, at = [], 0
    while at < len(payload):
        key = _read_varint(payload, at)
        if key is None:
            return None
        tag, end = key
        wire = tag & 7
        if wire == 0:
            value = _read_varint(payload, end)
            end = value[1] if value else -1
        elif wire in (1, 5):
            end += 8 if wire == 1 else 4
        elif wire == 2:
            length = _read_varint(payload, end)
            end = length[1] + length[0] if length else -1
        elif wire not in (3, 4):
            return None
        if end < 0 or end > len(payload):
            return None
        out.append(payload[at:end])
        at = end
    return out


def _length_delimited(field_bytes: bytes) -> tuple[bytes, bytes] | None:
    """(key, contents) of one length-delimited field, else None."""
    key = _read_varint(field_bytes, 0)
    if key is None or key[0] & 7 != 2:
        return None
    length = _read_varint(field_bytes, key[1])
    if length is None:
        return None
    return field_bytes[: key[1]], field_bytes[length[1] :]


def parse(payload: bytes) -> tts_pb2.SynthesizeRequest | None:
    """The request the server will see, or None where it cannot parse it (same protobuf runtime)."""
    try:
        return tts_pb2.SynthesizeRequest.FromString(payload)
    except DecodeError:
        return None


def bounded(request: tts_pb2.SynthesizeRequest) -> bool:
    """True if the model cannot run long on it: fixed_frames small, or so large it is refused."""
    o = request.options
    return o.HasField("fixed_frames") and (o.fixed_frames <= MAX_FUZZ_FRAMES or o.fixed_frames >= ALWAYS_REFUSED_FRAMES)


# --- cases ---------------------------------------------------------------------------------------------

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class Case:
    index: int
    family: str  # the mutations applied, e.g. "voices.bitflip+raw.truncate"
    payload: bytes  # the serialized request, exactly as sent
    metadata: Metadata = ()

    @property
    def header_bytes(self) -> int:
        return sum(len(k) + len(v) for k, v in self.metadata)

    @property
    def size(self) -> int:
        return len(self.payload) + self.header_bytes


class Generator:
    """Builds cases from one seeded random.Random: the same seed gives the same cases in the same order."""

    def __init__(self, seeds: Seeds, seed: int) -> None:
        self.seeds = seeds
        self.rng = random.Random(seed)
        rng = random.Random(seed ^ 0x5EED)
        # A bounded set of keys: distinct clients for Envoy's per-key buckets without growing its LRU of
        # descriptors (and its memory) for the length of the run.
        self.keys = [f"fuzz-{rng.getrandbits(48):012x}" for _ in range(48)]
        self.odd_keys: list[str] = [
            "", " ", "a", "K" * 200, "key with spaces", "'; DROP TABLE keys; --", "%00%0a", "\\n", "anonymous",
            "<script>", "k" * 7000, "k" * 12000, "k" * 20000,
        ]  # fmt: skip
        self.odd_keys += [
            "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(1, 64))) for _ in range(8)
        ]
        self.families: list[tuple[str, int, Callable[[tts_pb2.SynthesizeRequest], str]]] = [
            ("valid", 8, lambda r: "seed"),
            ("options", 18, self.m_options),
            ("format", 4, self.m_format),
            ("text", 18, self.m_text),
            ("request_id", 5, self.m_request_id),
            ("turns", 9, self.m_turns),
            ("voices", 14, self.m_voices),
            ("wav", 8, self.m_wav),
        ]

    # seeds

    def seed_request(self) -> tts_pb2.SynthesizeRequest:
        r = self.rng
        name = r.choice(sorted(self.seeds.scripts))
        text = self.seeds.scripts[name]
        if r.random() < 0.5:  # a prefix of the script: shorter prompts, cheaper calls
            lines = text.splitlines()
            text = "\n".join(lines[: r.randint(1, len(lines))])
        req = tts_pb2.SynthesizeRequest(format=r.choice(FORMATS))
        if r.random() < 0.3:
            req.request_id = f"fuzz-{r.getrandbits(32):08x}"
        if r.random() < 0.3 and _turns_of(text):
            req.turns.turns.extend(tts_pb2.Turn(speaker=s, text=t) for s, t in _turns_of(text))
        else:
            req.text = text
        for speaker in _speakers_in(text):
            if r.random() < 0.35:
                req.voices.append(tts_pb2.VoicePrompt(speaker=speaker, audio=r.choice(self.seeds.voices)))
        o = req.options
        o.fixed_frames = r.randint(1, MAX_FUZZ_FRAMES)
        if r.random() < 0.6:
            o.seed = r.getrandbits(64)
        if r.random() < 0.4:
            o.cfg_scale = r.uniform(0.1, 5.0)
        if r.random() < 0.4:
            o.diffusion_steps = r.randint(1, 20)
        if r.random() < 0.2:
            o.max_audio_seconds = r.uniform(0.1, 5.0)
        return req

    def metadata(self) -> tuple[Metadata, str]:
        r = self.rng
        x = r.random()
        if x < 0.12:
            return (), "none"
        if x < 0.72:
            return (("x-api-key", r.choice(self.keys)),), "key"
        if x < 0.90:
            return (("x-api-key", r.choice(self.odd_keys)),), "odd-key"
        if x < 0.94:
            return (("x-api-key", r.choice(self.keys)), ("x-api-key", r.choice(self.keys))), "two-keys"
        if x < 0.97:
            return (("x-api-key-bin", r.randbytes(r.randrange(0, 64))),), "bin-key"
        if x < 0.995:
            fwd = r.choice(["1.2.3.4", "::1", "not an address", "10.0.0.1, 10.0.0.2", ""])
            return (("x-api-key", r.choice(self.keys)), ("x-forwarded-for", fwd), ("x-request-id", "fuzz")), "fwd"
        return (("x-api-key", "k" * (ENVOY_MAX_HEADERS + 4096)),), "huge-key"

    def case(self, index: int) -> Case:
        r = self.rng
        req = self.seed_request()
        names = []
        picks = r.choices(self.families, weights=[w for _, w, _ in self.families], k=1)
        if r.random() < 0.2:
            picks += r.choices(self.families, weights=[w for _, w, _ in self.families], k=1)
        for family, _, mutate in picks:
            names.append(f"{family}.{mutate(req)}")
        payload = req.SerializeToString()
        if r.random() < 0.16:
            payload, raw = self.m_raw(payload)
            names.append(f"raw.{raw}")
        payload = self.bound(payload)
        metadata, meta = self.metadata()
        if meta != "key":
            names.append(f"meta.{meta}")
        return Case(index, "+".join(n for n in names if n != "valid.seed") or "valid", payload, metadata)

    def bound(self, payload: bytes) -> bytes:
        """Keep a request the model could run cheap: options are merged, so a trailing fixed_frames wins."""
        req = parse(payload)
        if req is None or bounded(req):
            return payload
        return payload + _field(6, 2, _field(5, 0, _varint(self.rng.randint(1, MAX_FUZZ_FRAMES))))

    # field mutations

    def m_options(self, req: tts_pb2.SynthesizeRequest) -> str:
        r, o = self.rng, req.options
        which = r.choice(["cfg_scale", "diffusion_steps", "seed", "max_audio_seconds", "fixed_frames", "clear"])
        if which == "cfg_scale":
            o.cfg_scale = r.choice(CFG_SCALES)
        elif which == "diffusion_steps":
            o.diffusion_steps = r.choice(DIFFUSION_STEPS)
        elif which == "seed":
            o.seed = r.choice(SEEDS)
        elif which == "max_audio_seconds":
            o.max_audio_seconds = r.choice(MAX_AUDIO_SECONDS)
        elif which == "fixed_frames":
            o.fixed_frames = r.choice(FIXED_FRAMES)
        else:
            req.ClearField("options")
        return which

    def m_format(self, req: tts_pb2.SynthesizeRequest) -> str:
        req.format = self.rng.choice(BAD_FORMATS + FORMATS)
        return "bad" if req.format not in FORMATS else "valid"

    def _insert(self, text: str, piece: str) -> str:
        at = self.rng.randrange(len(text) + 1)
        return text[:at] + piece + text[at:]

    def _set_text(self, req: tts_pb2.SynthesizeRequest, text: str) -> None:
        if req.WhichOneof("script") == "turns" and req.turns.turns:
            self.rng.choice(req.turns.turns).text = text
        else:
            req.text = text

    def _get_text(self, req: tts_pb2.SynthesizeRequest) -> str:
        if req.WhichOneof("script") == "turns" and req.turns.turns:
            return req.turns.turns[0].text
        return req.text

    def m_text(self, req: tts_pb2.SynthesizeRequest) -> str:
        r = self.rng
        text = self._get_text(req)
        which = r.choice(["empty", "huge", "unicode", "control", "special", "speaker", "lines", "plain", "junk"])
        if which == "empty":
            text = r.choice(["", " ", "\n\n", "\t", "Speaker 1:", "Speaker 1:   \nSpeaker 2:"])
        elif which == "huge":
            size = r.choice([512 * 1024 - 64, 512 * 1024 + 1, 600 * 1024, 64 * 1024])
            line = r.choice(["Speaker 1: " + "word " * 30, "Speaker 2: " + "é" * 100, "x" * 1000])
            text = (line + "\n") * (size // (len(line.encode()) + 1) + 1)
        elif which == "unicode":
            for _ in range(r.randint(1, 5)):
                text = self._insert(text, r.choice(UNICODE_SAMPLES))
        elif which == "control":
            for _ in range(r.randint(1, 5)):
                text = self._insert(text, r.choice(CONTROL_CHARS))
        elif which == "special":
            for _ in range(r.randint(1, 3)):
                text = self._insert(text, r.choice(SPECIAL_TOKENS))
        elif which == "speaker":
            lines = text.splitlines() or [text]
            i = r.randrange(len(lines))
            lines[i] = re.sub(r"^\s*Speaker\s+\d+\s*:", "", lines[i], flags=re.IGNORECASE)
            lines[i] = f"{r.choice(SPEAKER_PREFIXES)} {lines[i]}"
            text = "\n".join(lines)
        elif which == "lines":
            n = r.choice([5, 50, 500, 3000])
            text = "\n".join(
                f"Speaker {r.randint(1, r.choice([2, 4, 6]))}: {r.choice(['a', 'hello there', ''])}" for _ in range(n)
            )
        elif which == "plain":
            text = "Hello there. No speaker labels at all."
        else:
            alphabet = "".join(CONTROL_CHARS[:32]) + "abc :\n" + "".join(UNICODE_SAMPLES[:12])
            text = "Speaker 1: " + "".join(r.choice(alphabet) for _ in range(r.randint(1, 300)))
        self._set_text(req, text)
        return which

    def m_request_id(self, req: tts_pb2.SynthesizeRequest) -> str:
        r = self.rng
        x = r.random()
        if x < 0.15:
            req.request_id = "r" * r.choice([8 * 1024, 64 * 1024, 300 * 1024])
            return "huge"
        if x < 0.4:
            req.request_id = "".join(r.choice(CONTROL_CHARS) for _ in range(r.randint(1, 8)))
            return "control"
        req.request_id = r.choice(REQUEST_IDS + UNICODE_SAMPLES)
        return "odd"

    def m_turns(self, req: tts_pb2.SynthesizeRequest) -> str:
        r = self.rng
        text = req.text if req.WhichOneof("script") == "text" else ""
        turns = _turns_of(text) or [(t.speaker, t.text) for t in req.turns.turns] or [(1, "Hello.")]
        which = r.choice(["speaker", "empty_text", "none", "many", "all_empty", "huge", "control"])
        if which == "speaker":
            i = r.randrange(len(turns))
            turns[i] = (r.choice(SPEAKERS), turns[i][1])
        elif which == "empty_text":
            i = r.randrange(len(turns))
            turns[i] = (turns[i][0], r.choice(["", " ", "\n", "\t\t"]))
        elif which == "none":
            turns = []
        elif which == "many":
            turns = [(r.randint(0, 4), "hi") for _ in range(r.choice([100, 1000, 5000]))]
        elif which == "all_empty":
            turns = [(s, "") for s, _ in turns]
        elif which == "huge":
            turns = [(1, "word " * r.choice([20_000, 110_000]))]
        else:
            turns = [(s, self._insert(t, r.choice(CONTROL_CHARS + SPECIAL_TOKENS))) for s, t in turns]
        req.turns.SetInParent()  # an empty Script still selects turns
        del req.turns.turns[:]
        req.turns.turns.extend(tts_pb2.Turn(speaker=s, text=t) for s, t in turns)
        return which

    def m_voices(self, req: tts_pb2.SynthesizeRequest) -> str:
        r = self.rng
        if not req.voices:
            speakers = _speakers_in(req.text) or [t.speaker for t in req.turns.turns] or [1]
            req.voices.append(tts_pb2.VoicePrompt(speaker=r.choice(speakers), audio=r.choice(self.seeds.voices)))
        v = r.choice(req.voices)
        which = r.choice(["speaker", "duplicate", "too_many", "truncate", "garbage", "bitflip", "empty",
                          "oversize", "long", "magic"])  # fmt: skip
        if which == "speaker":
            v.speaker = r.choice(SPEAKERS)
        elif which == "duplicate":
            req.voices.append(tts_pb2.VoicePrompt(speaker=v.speaker, audio=r.choice(self.seeds.tiny_voices)))
        elif which == "too_many":
            for _ in range(r.randint(5, 8) - len(req.voices)):
                req.voices.append(tts_pb2.VoicePrompt(speaker=r.randint(0, 5), audio=r.choice(self.seeds.tiny_voices)))
        elif which == "truncate":
            v.audio = v.audio[: r.choice([0, 1, 3, 4, 11, 12, 36, 43, 44, 45, 100, r.randrange(len(v.audio) + 1)])]
        elif which == "garbage":
            v.audio = r.randbytes(r.choice([1, 16, 100, 4096, 65536]))
        elif which == "bitflip" and v.audio:  # (an earlier mutation may have left the voice empty)
            audio = bytearray(v.audio)
            header = r.random() < 0.7  # most of the parsing happens in the first bytes
            for _ in range(r.randint(1, 16)):
                i = r.randrange(min(len(audio), 128) if header else len(audio))
                audio[i] ^= 1 << r.randrange(8)
            v.audio = bytes(audio)
        elif which == "empty":
            v.audio = b""
        elif which == "oversize":
            # rare: 10 MB over the wire, refused by size before decoding
            v.audio = b"RIFF" + bytes(10 * 1024 * 1024 - 3) if r.random() < 0.1 else r.choice(self.seeds.tiny_voices)
        elif which == "long":
            # just over the limit (refused from the header), now and then just under it (slow: kept rare)
            seconds = 59.5 if r.random() < 0.1 else 60.5
            v.audio = _encode_audio(np.zeros(int(8000 * seconds), np.float32), 8000, "WAV", "PCM_U8")
        else:
            magic = r.choice([b"RIFF\xff\xff\xff\xffWAVE", b"fLaC", b"OggS", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"FORM",
                              b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x64"])  # fmt: skip
            v.audio = magic + r.randbytes(r.choice([0, 10, 1000]))
        return which

    def m_wav(self, req: tts_pb2.SynthesizeRequest) -> str:
        """A WAV whose header is valid but for one or two fields, so each absurd value meets the decoder."""
        r = self.rng
        speakers = _speakers_in(req.text) or [t.speaker for t in req.turns.turns] or [1]
        h = {"rate": 24000, "channels": 1, "bits": 16, "tag": 1, "size": "actual", "riff": "actual"}
        absurd = {
            # absurd, and at the edges of the accepted range (8 to 192 kHz)
            "rate": [
                0,
                1,
                2,
                7,
                100,
                4000,
                7999,
                8000,
                48000,
                96000,
                192000,
                192001,
                10**6,
                2**24,
                2**31 - 1,
                2**31,
                2**32 - 1,
            ],  # fmt: skip
            "channels": [0, 2, 3, 8, 255, 256, 1024, 1025, 65535],
            "bits": [0, 1, 7, 8, 12, 20, 24, 32, 33, 64, 65535],
            "tag": [3, 0, 2, 6, 7, 0x11, 0x55, 0xFFFE, 0xFFFF],
            "size": [0, 1, 0xFFFFFFFF, "x1000", "half"],
            "riff": [0, 4, 0xFFFFFFFF],
        }
        changed = r.sample(sorted(absurd), r.choice([1, 1, 2]))
        for name in changed:
            h[name] = r.choice(absurd[name])
        if h["tag"] == 3 and r.random() < 0.7:
            h["bits"] = 32  # float samples: mostly the valid width, so the values get read
        rate, channels, bits = h["rate"], h["channels"], h["bits"]
        # few samples: a real rate gives at most a few seconds, an absurd one a handful
        frames = r.choice([0, 1, 1, 2, 3, 100, int(min(rate, 48000) * r.uniform(0.05, 3.0))])
        block = channels * bits // 8
        nbytes = min(max(frames * block, 0), 400_000)
        if h["tag"] == 3 and bits == 32 and r.random() < 0.5:
            value = r.choice([math.nan, math.inf, -math.inf, 1e38, 0.0, 1e-45])
            data = struct.pack("<f", value) * (nbytes // 4)
        elif r.random() < 0.3:
            data = bytes(nbytes)
        else:
            data = (np.sin(np.arange(nbytes // 2) * 0.05) * 9000).astype("<i2").tobytes() + bytes(nbytes % 2)
        size = {"actual": len(data), "x1000": len(data) * 1000 & 0xFFFFFFFF, "half": len(data) // 2}.get(
            h["size"], h["size"]
        )
        fmt_chunk = struct.pack(
            "<HHIIHH",
            h["tag"],
            channels & 0xFFFF,
            rate & 0xFFFFFFFF,
            (rate * block) & 0xFFFFFFFF,
            block & 0xFFFF,
            bits & 0xFFFF,
        )
        wav = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", size)
        riff = len(wav) + len(data) if h["riff"] == "actual" else h["riff"]
        wav = b"RIFF" + struct.pack("<I", riff) + wav + data
        req.voices.append(tts_pb2.VoicePrompt(speaker=r.choice(speakers), audio=wav))
        if len(req.voices) > 1 and r.random() < 0.7:
            del req.voices[0]  # mostly one voice: the header is what gets tested
        return ",".join(f"{name}={h[name]}" for name in changed)

    # raw byte mutations

    def m_raw(self, payload: bytes) -> tuple[bytes, str]:
        r = self.rng
        which = r.choice(["bitflip", "truncate", "random", "insert", "concat", "bad_utf8", "unknown_fields",
                          "varint", "groups", "wire_type"])  # fmt: skip
        data = bytearray(payload)
        if which == "bitflip" and data:
            for _ in range(r.randint(1, 8)):
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
        elif which == "truncate":
            data = data[: r.randrange(len(data) + 1)]
        elif which == "random":
            data = bytearray(r.randbytes(r.randint(1, 200)))
        elif which == "insert":
            at = r.randrange(len(data) + 1)
            data[at:at] = r.randbytes(r.randint(1, 16))
        elif which == "concat":
            data += self.seed_request().SerializeToString()
        elif which == "bad_utf8":
            bad = r.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"])
            text = b"Speaker 1: hi " + bad
            data += r.choice(
                [
                    _field(1, 2, bad),  # request_id
                    _field(2, 2, text),  # text
                    _field(3, 2, _field(1, 2, _field(1, 0, b"\x01") + _field(2, 2, text))),  # a turn's text
                ]
            )
        elif which == "unknown_fields":
            data += _field(r.choice([7, 99, 536870911]), 2, r.randbytes(r.randint(0, 32))) + _field(15, 0, _varint(1))
        elif which == "varint":
            data += _varint(5 << 3 | 0) + b"\xff" * r.choice([9, 10, 11])  # format with an overlong varint
        elif which == "groups":
            depth = r.choice([10, 99, 101, 1000])
            data += _varint(15 << 3 | 3) * depth + _varint(15 << 3 | 4) * depth
        else:
            data += _varint(r.choice([1, 2, 4, 6]) << 3 | r.choice([1, 3, 4, 5, 6, 7])) + r.randbytes(8)
        return bytes(data), which


# --- calls ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: str  # a grpc.StatusCode name, or BAD_STREAM / CLIENT_ERROR
    details: str
    seconds: float
    frames: int = 0
    data: bytes = b""  # the audio (kept for the good stream only)
    fields: tuple[str, ...] = ()  # the BadRequest field violations of an INVALID_ARGUMENT


class Pacer:
    """Spaces call starts evenly: Envoy's buckets see a steady rate, not bursts."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(max(0.0, start - now))


def client_rate_limit(config_path: Path = ENVOY_CONFIG) -> float:
    """The lowest per-client rate (calls per second) of Envoy's local rate limit descriptors."""
    config = yaml.safe_load(config_path.read_text())
    rates = []

    def walk(node) -> None:
        if isinstance(node, dict):
            bucket = node.get("token_bucket")
            if bucket and "entries" in node:
                interval = str(bucket.get("fill_interval", "1s"))
                seconds = float(interval[:-2]) / 1000 if interval.endswith("ms") else float(interval.rstrip("s"))
                rates.append(bucket.get("tokens_per_fill", 1) / seconds)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return min(rates) if rates else 20.0


class Caller:
    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._local = threading.local()
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def _channel(self) -> grpc.Channel:
        ch = getattr(self._local, "channel", None)
        if ch is None:
            ch = self._local.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            with self._lock:
                self._channels.append(ch)
        return ch

    def close(self) -> None:
        with self._lock:
            for ch in self._channels:
                ch.close()
            self._channels.clear()

    def call(self, case: Case, keep_data: bool = False, timeout: float | None = None) -> Outcome:
        own = case.header_bytes > ENVOY_MAX_HEADERS // 2  # Envoy may drop the connection: not a shared one
        channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) if own else self._channel()
        rpc = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        started = time.monotonic()
        frames, data, kinds, echoed = 0, [], [], None
        try:
            for raw in rpc(case.payload, metadata=case.metadata or None, timeout=timeout or self.timeout):
                response = tts_pb2.SynthesizeResponse.FromString(raw)
                kind = response.WhichOneof("event")
                kinds.append(kind)
                if kind == "header" and echoed is None:
                    echoed = response.header.request_id
                if kind == "audio" and response.audio.data:
                    frames += 1
                    if keep_data:
                        data.append(response.audio.data)
        except grpc.RpcError as e:
            try:
                status = rpc_status.from_call(e)
            except ValueError:  # a status whose details disagree with its code or message
                status = None
            fields = tuple(f for f, _ in bad_request_fields(status)) if status is not None else ()
            return Outcome(e.code().name, e.details() or "", time.monotonic() - started, frames, fields=fields)
        except Exception as e:  # a fuzzer or client-library fault, kept apart from the server's answers
            return Outcome("CLIENT_ERROR", f"{type(e).__name__}: {e}", time.monotonic() - started)
        finally:
            if own:
                channel.close()
        seconds = time.monotonic() - started
        problem = _stream_problem(case, kinds, echoed)
        if problem:
            return Outcome("BAD_STREAM", problem, seconds, frames)
        return Outcome("OK", "", seconds, frames, b"".join(data))


def _stream_problem(case: Case, kinds: list[str], echoed: str | None) -> str:
    """What is wrong with an OK stream: a header first, a summary last, each once; the request id echoed."""
    if not kinds or kinds[0] != "header" or kinds.count("header") != 1:
        return f"stream does not start with one header: {kinds[:3]}"
    if kinds[-1] != "summary" or kinds.count("summary") != 1:
        return f"stream does not end with one summary: {kinds[-3:]}"
    req = parse(case.payload)
    if req is not None and req.request_id and echoed != req.request_id:
        return f"header.request_id {_abbreviate(echoed or '', 60)} is not the request's"
    return ""


# Where an INVALID_ARGUMENT may point: the public request's own fields.
PUBLIC_FIELD = re.compile(
    r"request|request_id|text|format|turns(\[\d+\](\.(speaker|text))?)?|voices(\[\d+\](\.(speaker|audio))?)?"
    r"|options(\.(cfg_scale|diffusion_steps|seed|max_audio_seconds|fixed_frames))?"
)


def observation(case: Case, out: Outcome) -> str:
    """Allowed but wrong answers, reported apart from the requirements: a rejection that blames a field
    the caller never sent (an internal message's), or that names no field at all."""
    if out.code != "INVALID_ARGUMENT":
        return ""
    if not out.fields:
        return f"INVALID_ARGUMENT without a field: {signature(out)}"
    if any(not PUBLIC_FIELD.fullmatch(f) for f in out.fields):
        return f"INVALID_ARGUMENT blames a field SynthesizeRequest does not have: {signature(out)}"
    return ""


def classify(case: Case, out: Outcome) -> str:
    """'' for an allowed outcome, else why not. UNAVAILABLE is allowed only where the fuzzer knows why."""
    if out.code in ALLOWED:
        return ""
    if out.code == "UNAVAILABLE" and case.header_bytes > ENVOY_MAX_HEADERS:
        return ""
    return out.code


def explain(case: Case, out: Outcome) -> str:
    """The cause of an allowed rejection, for the report."""
    if out.code == "RESOURCE_EXHAUSTED":
        if "local_rate_limited" in out.details:
            return "Envoy rate limiter"
        if "metadata" in out.details:
            return "gRPC metadata size limit (gateway)"
        return "gateway admission"
    if out.code == "UNAVAILABLE":
        return "headers over Envoy's 60 KiB limit (connection dropped)"
    return ""


def signature(out: Outcome) -> str:
    """A failure's kind: its code and its message, with numbers and addresses blanked."""
    details = re.sub(r"0x[0-9a-f]+|\d+", "#", out.details)
    return f"{out.code}: {details[:160]}"


# --- shrinking -----------------------------------------------------------------------------------------


def _ddmin(items: Sequence, still_fails: Callable[[Sequence], bool], budget: list[int]) -> Sequence:
    """Delta debugging: remove chunks (halves, quarters, ...) while the failure remains."""
    n = 2
    while len(items) >= 1 and budget[0] > 0:
        chunk = max(1, len(items) // n)
        removed = False
        for start in range(0, len(items), chunk):
            if budget[0] <= 0:
                break
            candidate = items[:start] + items[start + chunk :]
            if still_fails(candidate):
                items, removed = candidate, True
                n = max(n - 1, 2)
                break
        if not removed:
            if chunk == 1:
                break
            n = min(len(items), n * 2)
    return items


class Shrinker:
    """Finds a small request (and metadata) that still fails with the same signature."""

    def __init__(self, send: Callable[[Case], Outcome], key: Callable[[Case, Outcome], str]) -> None:
        self.send = send
        self.key = key  # a case's failure signature, "" if it passes
        self.budget = [0]
        self.spent = 0

    def _fails(self, case: Case, target: str) -> bool:
        req = parse(case.payload)
        if req is not None and not bounded(req):
            return False  # never sent: it could run long
        if self.budget[0] <= 0:
            return False
        self.budget[0] -= 1
        self.spent += 1
        return self.key(case, self.send(case)) == target

    def shrink(self, case: Case, target: str, budget: int) -> Case:
        self.budget[0] = budget
        best = case
        plain = Case(case.index, case.family, case.payload, (("x-api-key", "fuzz-shrink"),))
        if case.metadata != plain.metadata and self._fails(plain, target):
            best = plain
        if parse(best.payload) is not None:
            return self._shrink_fields(best, target)
        return self._shrink_wire(best, target)

    def _shrink_wire(self, case: Case, target: str) -> Case:
        """An unparseable payload: drop whole top-level fields, then shorten each length-delimited one's
        contents (its length re-encoded), then single bytes."""
        best = case

        def fails(payload: bytes) -> bool:
            nonlocal best
            if len(payload) >= len(best.payload) or not self._fails(_with(best, payload), target):
                return False
            best = _with(best, payload)
            return True

        fields = _wire_fields(best.payload)
        if fields is not None:
            fields = list(_ddmin(fields, lambda fs: fails(b"".join(fs)), self.budget))
            for i, f in enumerate(fields):
                split = _length_delimited(f)
                if split is None:
                    continue
                key, inner = split

                def with_inner(content: Sequence, i: int = i, key: bytes = key) -> bytes:
                    data = bytes(content)
                    return b"".join([*fields[:i], key + _varint(len(data)) + data, *fields[i + 1 :]])

                inner = bytes(_ddmin(inner, lambda c, w=with_inner: fails(w(c)), self.budget))
                fields[i] = key + _varint(len(inner)) + inner
        _ddmin(best.payload, lambda p: fails(bytes(p)), self.budget)
        return best

    def _shrink_fields(self, case: Case, target: str) -> Case:
        state = {"case": case, "req": parse(case.payload)}

        def adopt(edit: Callable[[tts_pb2.SynthesizeRequest], None]) -> bool:
            """Apply edit to the current request; keep it if it is smaller and still fails the same way."""
            candidate = tts_pb2.SynthesizeRequest()
            candidate.CopyFrom(state["req"])
            edit(candidate)
            smaller = _with(state["case"], candidate.SerializeToString())
            if len(smaller.payload) >= len(state["case"].payload) or not self._fails(smaller, target):
                return False
            state["case"], state["req"] = smaller, candidate
            return True

        def ddmin_field(items: list, setter: Callable[[tts_pb2.SynthesizeRequest, Sequence], None]) -> None:
            _ddmin(items, lambda seq: adopt(lambda r: setter(r, seq)), self.budget)

        req = state["req"]
        adopt(lambda r: r.ClearField("request_id"))
        for i in reversed(range(len(req.voices))):
            adopt(lambda r, i=i: r.voices.__delitem__(i))
        for name in ("cfg_scale", "diffusion_steps", "seed", "max_audio_seconds"):
            adopt(lambda r, name=name: r.options.ClearField(name))
        adopt(lambda r: r.ClearField("format"))
        req = state["req"]
        if req.WhichOneof("script") == "turns":

            def set_turns(r: tts_pb2.SynthesizeRequest, turns: Sequence) -> None:
                del r.turns.turns[:]
                r.turns.turns.extend(tts_pb2.Turn(speaker=s, text=t) for s, t in turns)

            ddmin_field([(t.speaker, t.text) for t in req.turns.turns], set_turns)
        elif req.text:
            ddmin_field(req.text.splitlines(keepends=True), lambda r, ls: setattr(r, "text", "".join(ls)))
            ddmin_field(list(state["req"].text), lambda r, cs: setattr(r, "text", "".join(cs)))
        if state["req"].request_id:
            ddmin_field(list(state["req"].request_id), lambda r, cs: setattr(r, "request_id", "".join(cs)))
        for i in range(len(state["req"].voices)):
            audio = state["req"].voices[i].audio

            def set_audio(r: tts_pb2.SynthesizeRequest, blocks: Sequence, i: int = i) -> None:
                r.voices[i].audio = b"".join(blocks)

            # 64-byte blocks: a header stays whole while the samples go
            ddmin_field([audio[j : j + 64] for j in range(0, len(audio), 64)], set_audio)
        return state["case"]


def _with(case: Case, payload: bytes) -> Case:
    return Case(case.index, case.family, payload, case.metadata)


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class Failure:
    signature: str
    count: int = 0
    first: Case | None = None
    smallest: Case | None = None
    shrunk: Case | None = None
    families: Counter = field(default_factory=Counter)


@dataclass
class Report:
    requests: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    counts: Counter = field(default_factory=Counter)
    causes: Counter = field(default_factory=Counter)  # allowed rejections by cause
    by_family: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[str, Failure] = field(default_factory=dict)
    observations: dict[str, Failure] = field(default_factory=dict)  # allowed, but wrong: not requirements
    crashes: dict[str, int] = field(default_factory=dict)
    crash_suspects: list[Case] = field(default_factory=list)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    rss_timeline: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    good_runs: int = 0
    good_mismatches: list[str] = field(default_factory=list)
    good_rounding: int = 0  # runs that differ from the solo run by rounding only (a batch of other shape)
    good_max_difference: float = 0.0  # largest difference from the solo run, as a share of its peak
    slowest: list[tuple[float, str, str]] = field(default_factory=list)  # (seconds, code, family)

    @property
    def limiter_share(self) -> float:
        return self.causes["Envoy rate limiter"] / max(1, self.requests)

    def problems(self) -> list[str]:
        out = []
        for code in ("INTERNAL", "UNKNOWN"):
            if self.counts[code]:
                out.append(f"{self.counts[code]} calls ended {code}")
        unexpected = {c: n for c, n in self.counts.items() if c not in ALLOWED and c not in ("INTERNAL", "UNKNOWN")}
        explained = self.causes["headers over Envoy's 60 KiB limit (connection dropped)"]
        if unexpected.get("UNAVAILABLE", 0) > explained:
            out.append(f"{unexpected['UNAVAILABLE'] - explained} calls ended UNAVAILABLE without a known cause")
        out += [f"{n} calls ended {c}" for c, n in unexpected.items() if c != "UNAVAILABLE"]
        out += [f"{name} exited with status {rc}" for name, rc in self.crashes.items()]
        for name, before in self.rss_before.items():
            after = self.rss_after.get(name)
            if after is not None and not rss_within(name, before, after):
                allowed = f"{RSS_TOLERANCE:.0%}" + (
                    f" + {BOUNDED_CACHE_BYTES[name] >> 20} MiB of caches" if name in BOUNDED_CACHE_BYTES else ""
                )
                out.append(f"{name} RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB (over {allowed})")
        if self.good_runs == 0:
            out.append("no good stream completed during the fuzz")
        if self.good_mismatches:
            out.append(
                f"good stream: {len(self.good_mismatches)} of {self.good_runs} runs differ from the solo run "
                f"(first: {self.good_mismatches[0]})"
            )
        if self.limiter_share > 0.5:
            out.append(f"the Envoy rate limiter refused {self.limiter_share:.0%} of the calls")
        return out

    def format(self) -> str:
        lines = [
            f"fuzz: {self.requests} requests in {self.seconds:.0f} s "
            f"({self.requests / max(self.seconds, 1e-9):.1f}/s, paced at {self.rate:.1f}/s)"
        ]
        lines += [f"  {code:<20} {n}" for code, n in self.counts.most_common()]
        lines.append("allowed rejections by cause:")
        lines += [f"  {cause:<56} {n}" for cause, n in self.causes.most_common()]
        lines.append(f"Envoy rate limiter share: {self.limiter_share:.1%}")
        if self.slowest:
            lines.append("slowest calls: " + ", ".join(f"{s:.1f} s {c} {f}" for s, c, f in self.slowest[:5]))
        lines.append("RSS (MiB), after warm-up -> after fuzz:")
        for name, before in self.rss_before.items():
            after = self.rss_after.get(name, 0)
            lines.append(
                f"  {name:<12} {before / 2**20:8.1f} -> {after / 2**20:8.1f} ({(after - before) / before:+.1%})"
            )
        identical = self.good_runs - len(self.good_mismatches) - self.good_rounding
        lines.append(f"good streams during the fuzz: {self.good_runs}, bit-identical to the solo run: {identical}, "
                     f"within rounding: {self.good_rounding} (largest difference "
                     f"{self.good_max_difference:.2g} of the peak)")  # fmt: skip
        lines += [f"  {m}" for m in self.good_mismatches[:3]]
        if self.rss_timeline:
            lines.append("RSS (MiB) during the fuzz, by requests answered:")
            for n, sample in self.rss_timeline:
                lines.append(f"  {n:>6}: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sample.items()))
        for name, rc in self.crashes.items():
            lines.append(f"CRASH: {name} exited with status {rc}; requests in flight or just before:")
            lines += [f"    {describe(c)}" for c in self.crash_suspects]
        for title, found in (("FAILURE", self.failures), ("OBSERVATION (not a requirement)", self.observations)):
            for f in sorted(found.values(), key=lambda f: -f.count):
                lines.append(f"{title} x{f.count}: {f.signature}")
                lines.append("  families: " + ", ".join(f"{k} ({n})" for k, n in f.families.most_common(5)))
                case = f.shrunk or f.smallest
                if case is not None:
                    lines.append(f"  smallest reproducer ({len(case.payload)} bytes, case #{case.index}):")
                    lines += ["    " + line for line in describe(case).splitlines()]
        problems = self.problems()
        lines.append("requirements: " + ("all met" if not problems else "FAILED"))
        lines += [f"  - {p}" for p in problems]
        return "\n".join(lines)

    def to_json(self) -> dict:
        def case_json(c: Case | None) -> dict | None:
            if c is None:
                return None
            meta = [[k, v if isinstance(v, str) else v.hex()] for k, v in c.metadata]
            return {"index": c.index, "family": c.family, "payload_hex": c.payload.hex(), "metadata": meta}

        def found_json(found: dict[str, Failure]) -> list[dict]:
            return [
                {
                    "signature": f.signature,
                    "count": f.count,
                    "families": dict(f.families),
                    "reproducer": case_json(f.shrunk or f.smallest),
                }
                for f in found.values()
            ]

        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "counts": dict(self.counts),
            "causes": dict(self.causes),
            "by_family": {k: dict(v) for k, v in self.by_family.items()},
            "limiter_share": self.limiter_share,
            "rss_before": self.rss_before,
            "rss_after": self.rss_after,
            "rss_timeline": self.rss_timeline,
            "crashes": self.crashes,
            "crash_suspects": [case_json(c) for c in self.crash_suspects],
            "good_runs": self.good_runs,
            "good_mismatches": self.good_mismatches,
            "good_rounding": self.good_rounding,
            "good_max_difference": self.good_max_difference,
            "failures": found_json(self.failures),
            "observations": found_json(self.observations),
            "problems": self.problems(),
        }


def _abbreviate(value: bytes | str, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]} ({len(value)} long)"


def describe(case: Case) -> str:
    """A reproducer: the request as text where it parses, its bytes as hex, the metadata."""
    meta = ", ".join(f"{k}={_abbreviate(v, 80)}" for k, v in case.metadata) or "none"
    req = parse(case.payload)
    if req is not None:
        shown = tts_pb2.SynthesizeRequest()
        shown.CopyFrom(req)
        for v in shown.voices:
            if len(v.audio) > 256:
                v.audio = v.audio[:96] + b"...(" + str(len(v.audio)).encode() + b" bytes)"
        if len(shown.text) > 300:
            shown.text = shown.text[:150] + f"...({len(req.text)} chars)..." + shown.text[-100:]
        if len(shown.request_id) > 100:
            shown.request_id = shown.request_id[:50] + f"...({len(req.request_id)} chars)"
        body = text_format.MessageToString(shown, as_one_line=True, as_utf8=False)
    else:
        body = "(does not parse as a SynthesizeRequest)"
    hexed = case.payload.hex() if len(case.payload) <= 2048 else case.payload[:1024].hex() + "..."
    return f"family: {case.family}\nrequest: {body}\nbytes: {hexed}\nmetadata: {meta}"


def rss_within(name: str, before: int, after: int) -> bool:
    """A process's RSS after the fuzz against its value after the warm-up: within the tolerance either way, and
    up by at most what its bounded caches may hold besides."""
    return -RSS_TOLERANCE * before <= after - before <= RSS_TOLERANCE * before + BOUNDED_CACHE_BYTES.get(name, 0)


def settled_rss(
    processes: dict[str, subprocess.Popen],
    send: Callable[[Case], object],
    seconds: int,
    enough: Callable[[dict[str, int]], bool] | None = None,
) -> dict[str, int]:
    """Each process's lowest RSS over `seconds` (or until `enough` of the lowest so far). A service frees a finished
    call's memory lazily: an idle gateway kept ~500 MiB of 80 refused 10 MB requests for 20 s and let it go only
    once new calls came in (measured; also with a fixed mmap threshold, so live objects, not the allocator). So a
    few tiny refused calls go each second."""
    lowest: dict[str, int] = {}
    poke = Case(-3, "settle", b"", (("x-api-key", "fuzz-settle"),))
    for _ in range(seconds):
        for _ in range(5):
            send(poke)
        time.sleep(0.5)
        for name, value in rss(processes).items():
            lowest[name] = min(value, lowest.get(name, value))
        if enough is not None and enough(lowest):
            break
    return lowest


def rss(processes: dict[str, subprocess.Popen]) -> dict[str, int]:
    out = {}
    for name, proc in processes.items():
        try:
            p = psutil.Process(proc.pid)
            out[name] = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            out[name] = 0
    return out


def warm_up_cases(seeds: Seeds) -> list[Case]:
    """Every output format, voices in each container, turns and the longer scripts: the paths fuzz takes."""
    cases = []
    texts = [*seeds.scripts.values(), *seeds.long_scripts.values()][:8]
    for i, fmt in enumerate([*FORMATS, *FORMATS]):
        text = texts[i % len(texts)]
        speakers = _speakers_in(text) or [1]
        req = tts_pb2.SynthesizeRequest(
            text=text,
            format=fmt,
            voices=[tts_pb2.VoicePrompt(speaker=speakers[0], audio=seeds.voices[i % len(seeds.voices)])],
            options=tts_pb2.GenerationOptions(fixed_frames=MAX_FUZZ_FRAMES, seed=i),
        )
        if i % 3 == 1:
            req.turns.turns.extend(tts_pb2.Turn(speaker=s, text=t) for s, t in _turns_of(text))
        cases.append(Case(-1 - i, "warm-up", req.SerializeToString(), (("x-api-key", f"fuzz-warm-{i % 4}"),)))
    for payload in (
        b"",
        b"\x28\x63",
        tts_pb2.SynthesizeRequest(text="Speaker 1: hi").SerializeToString() + b"\x32\x02\x28\x00",
    ):
        cases.append(Case(-100, "warm-up", payload, (("x-api-key", "fuzz-warm-bad"),)))
    # The largest requests the fuzz sends, a few at once: buffers and allocator pools reach the size the
    # fuzz will need before the baseline is taken, so what is compared afterwards is growth, not first use.
    big = tts_pb2.SynthesizeRequest(text="Speaker 1: hi", options=tts_pb2.GenerationOptions(fixed_frames=1))
    heavy = [
        tts_pb2.SynthesizeRequest(
            text="Speaker 1: hi",
            voices=[tts_pb2.VoicePrompt(speaker=1, audio=b"RIFF" + bytes(10 * 1024 * 1024 - 3))],
            options=tts_pb2.GenerationOptions(fixed_frames=1),
        ),
        tts_pb2.SynthesizeRequest(text=("Speaker 1: " + "word " * 30 + "\n") * 4000, options=big.options),
        tts_pb2.SynthesizeRequest(request_id="r" * 300 * 1024, text="Speaker 1: hi", options=big.options),
    ]
    for j, req in enumerate(heavy):
        for i in range(4):
            cases.append(Case(-200 - j, "warm-up", req.SerializeToString(), (("x-api-key", f"fuzz-warm-{i}"),)))
    cases.append(Case(-300, "warm-up", big.SerializeToString(), (("x-api-key", "k" * (ENVOY_MAX_HEADERS + 4096)),)))
    cases.append(Case(-301, "warm-up", big.SerializeToString(), (("x-api-key", "k" * 20000),)))
    return cases


def run_fuzz(
    address: str,
    requests: int = 2000,
    seed: int = 20251202,
    processes: dict[str, subprocess.Popen] | None = None,
    concurrency: int = 3,
    rate: float | None = None,
    timeout: float = 30.0,
    shrink_budget: int = 300,
    warm_up: int | None = None,
    settle_s: int = 15,
    seeds: Seeds | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Report:
    """Fuzz the mesh behind `address`; `processes` (name -> Popen, Envoy included) are watched for crashes
    and RSS. Returns the report; Report.problems() lists the requirements that failed."""
    seeds = seeds or Seeds.load(seed=seed)
    warm_up = min(300, max(50, requests // 20)) if warm_up is None else warm_up
    processes = dict(processes or {})
    report = Report(requests=0, rate=rate or 0.75 * client_rate_limit())
    pacer = Pacer(report.rate)
    caller = Caller(address, timeout)
    gen = Generator(seeds, seed)
    lock = threading.Lock()

    def send(case: Case, **kw) -> Outcome:
        pacer.wait()
        return caller.call(case, **kw)

    try:
        # The good request alone, before anything else runs: the reference its later runs must match.
        good = Case(-2, "good", seeds.good_request().SerializeToString(), (("x-api-key", "fuzz-good"),))
        solo = send(good, keep_data=True, timeout=300.0)
        if solo.code != "OK" or solo.frames != GOOD_FRAMES:
            report.good_mismatches.append(f"solo run ended {solo.code} {solo.details!r} with {solo.frames} frames")
        log(f"fuzz: good stream alone: {solo.code}, {solo.frames} frames in {solo.seconds:.1f} s")

        # Warm-up, a few calls at once so the slots and buffers the fuzz will use are touched: the fixed
        # cases, then a short fuzz of its own seed (not counted). Allocators and caches
        # reach the size this mix of requests needs (measured: the gateway's RSS climbs most of its 10-20 %
        # over the first few hundred fuzz calls), so the comparison afterwards sees growth that goes on,
        # not first use.
        warm_gen = Generator(seeds, seed + 1)
        warm = warm_up_cases(seeds) + [warm_gen.case(-1000 - i) for i in range(warm_up)]
        with ThreadPoolExecutor(concurrency + 1) as pool:
            list(pool.map(send, warm))
        gc.collect()
        # Measured as the value after the fuzz is (below): each process's lowest sample while it settles. A single
        # sample right after the warm-up could catch memory a service had not yet let go of, and the fuzz's
        # settled value then came out over 10 % below it.
        report.rss_before = settled_rss(processes, send, 3)
        log(f"fuzz: warm-up done ({len(warm)} calls); sending {requests} requests at {report.rate:.1f}/s")

        stop = threading.Event()

        def good_loop() -> None:
            while not stop.is_set():
                out = send(good, keep_data=True, timeout=300.0)
                with lock:
                    report.good_runs += 1
                    if out.code != "OK":
                        report.good_mismatches.append(f"run {report.good_runs} ended {out.code}: {out.details}")
                    elif out.data != solo.data:
                        report.good_max_difference = max(report.good_max_difference, _difference(solo.data, out.data))
                        if report.good_max_difference >= GOOD_TOLERANCE:
                            report.good_mismatches.append(_first_difference(report.good_runs, solo.data, out.data))
                        else:
                            report.good_rounding += 1
                stop.wait(GOOD_GAP_S)

        good_thread = threading.Thread(target=good_loop, name="fuzz-good", daemon=True)
        recent: deque[Case] = deque(maxlen=8)
        in_flight: dict[int, Case] = {}
        slots = threading.Semaphore(concurrency)
        started = time.monotonic()

        def run_one(case: Case) -> None:
            try:
                out = send(case)
                why = classify(case, out)
                with lock:
                    report.requests += 1
                    report.counts[out.code] += 1
                    family = case.family.split("+")[0]
                    report.by_family[family][out.code] += 1
                    if cause := (explain(case, out) if not why else ""):
                        report.causes[cause] += 1
                    report.slowest = sorted([*report.slowest, (out.seconds, out.code, case.family)], reverse=True)[:5]
                    if why:
                        _record(report.failures, signature(out), case)
                    elif seen := observation(case, out):
                        _record(report.observations, seen, case)
                    in_flight.pop(case.index, None)
                    recent.append(case)
            finally:
                slots.release()

        good_thread.start()
        with ThreadPoolExecutor(concurrency) as pool:
            for i in range(requests):
                crashed = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
                if crashed:
                    report.crashes.update(crashed)
                    with lock:
                        report.crash_suspects = [*in_flight.values(), *recent]
                    log(f"fuzz: {', '.join(crashed)} exited; stopping after {i} requests")
                    break
                case = gen.case(i)
                slots.acquire()
                with lock:
                    in_flight[case.index] = case
                pool.submit(run_one, case)
                if i % 250 == 0 and processes:
                    report.rss_timeline.append((report.requests, rss(processes)))
                if i and i % 500 == 0:
                    log(f"fuzz: {i} sent, {dict(report.counts)}")
        stop.set()
        good_thread.join(600)
        report.seconds = time.monotonic() - started
        report.crashes.update({n: p.returncode for n, p in processes.items() if p.poll() is not None})

        if not report.crashes:
            # Failures first; observations get what is left.
            spent = _shrink_all(
                send, report.failures, lambda c, o: signature(o) if classify(c, o) else "", shrink_budget
            )
            spent += _shrink_all(send, report.observations, observation, shrink_budget - spent)
            log(f"fuzz: shrinking used {spent} calls")

        # Let the services settle, then compare memory.
        gc.collect()
        report.rss_after = settled_rss(
            processes,
            send,
            settle_s,
            lambda lowest: all(rss_within(n, b, lowest[n]) for n, b in report.rss_before.items()),
        )
        report.crashes.update({n: p.returncode for n, p in processes.items() if p.poll() is not None})
    finally:
        caller.close()
    return report


def _record(into: dict[str, Failure], key: str, case: Case) -> None:
    f = into.setdefault(key, Failure(key))
    f.count += 1
    f.families[case.family] += 1
    f.first = f.first or case
    if f.smallest is None or case.size < f.smallest.size:
        f.smallest = case


def _shrink_all(
    send: Callable[[Case], Outcome], found: dict[str, Failure], key: Callable[[Case, Outcome], str], budget: int
) -> int:
    """Shrink each finding within an equal share of the budget; the calls spent."""
    shrinker = Shrinker(send, key)
    if not found or budget <= 0:
        return 0
    each = max(20, budget // len(found))
    for f in sorted(found.values(), key=lambda f: -f.count):
        if f.smallest is not None and shrinker.spent < budget:
            f.shrunk = shrinker.shrink(f.smallest, f.signature, min(each, budget - shrinker.spent))
    return shrinker.spent


def _difference(expected: bytes, got: bytes) -> float:
    """The largest difference between two float32 streams as a share of the first one's peak (inf if the lengths
    differ)."""
    if len(expected) != len(got):
        return float("inf")
    a, b = np.frombuffer(expected, "<f4"), np.frombuffer(got, "<f4")
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12))


def _first_difference(run: int, expected: bytes, got: bytes) -> str:
    """Where float32 audio first differs, and by how much (the size of the difference tells rounding from a
    wrong stream)."""
    if len(expected) != len(got):
        return f"run {run}: {len(got)} bytes of audio, the solo run had {len(expected)}"
    a, b = np.frombuffer(expected, "<f4"), np.frombuffer(got, "<f4")
    differ = np.flatnonzero(a != b)
    worst = float(np.abs(a - b).max())
    return (
        f"run {run}: {len(differ)} of {len(a)} samples differ, from sample {differ[0]} "
        f"(frame {differ[0] // 3200}); largest difference {worst:.3g} (peak {float(np.abs(a).max()):.3g})"
    )


# --- command line --------------------------------------------------------------------------------------


def replay(address: str, payload_hex: str, metadata: Metadata, timeout: float) -> Outcome:
    caller = Caller(address, timeout)
    try:
        return caller.call(Case(0, "replay", bytes.fromhex(payload_hex), metadata))
    finally:
        caller.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=20251202)
    p.add_argument("--concurrency", type=int, default=3, help="fuzz calls in flight at once (besides the good stream)")
    p.add_argument(
        "--rate", type=float, default=None, help="calls per second (default: 75%% of Envoy's per-client limit)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--shrink-budget", type=int, default=400, help="calls spent shrinking failures to reproducers")
    p.add_argument("--address", default=None, help="fuzz a running mesh's Envoy (no crash or memory checks)")
    p.add_argument("--json", default="out/fuzz/report.json")
    p.add_argument("--replay", metavar="HEX", help="send one serialized request (a reproducer's bytes) and exit")
    p.add_argument("--api-key", default=None, help="x-api-key for --replay")
    args = p.parse_args(argv)

    if args.replay is not None:
        if args.address is None:
            p.error("--replay needs --address")
        out = replay(args.address, args.replay, (("x-api-key", args.api_key),) if args.api_key else (), args.timeout)
        print(f"{out.code}: {out.details}")
        return 0

    with contextlib.ExitStack() as stack:
        processes: dict[str, subprocess.Popen] = {}
        address = args.address
        if address is None:
            from services.mesh import Mesh, Ports

            log_dir = ROOT / "out" / "fuzz" / "logs"
            mesh = Mesh(
                ports=Ports.free(), model="tiny", device="cpu", dtype="float32",
                allow_fixed_frames=True, log_dir=log_dir,
            )  # fmt: skip
            print(f"starting the mesh (logs in {log_dir})", file=sys.stderr, flush=True)
            stack.enter_context(mesh)
            processes = mesh.processes
            address = f"127.0.0.1:{mesh.ports.envoy}"
        report = run_fuzz(
            address,
            requests=args.requests,
            seed=args.seed,
            processes=processes,
            concurrency=args.concurrency,
            rate=args.rate,
            timeout=args.timeout,
            shrink_budget=args.shrink_budget,
        )
    print(report.format())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=1))
        print(f"report: {path}")
    if args.address is not None:
        print("note: --address given: crashes and memory were not checked")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())

"""The public API through Envoy: outside clients (grpcurl), health everywhere, and which weights live where."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import soundfile as sf
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from tests.conftest import SCRIPTS, VOICES


def grpcurl(*args: str, data: str | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    cmd = [binary, "-plaintext", "-max-msg-sz", str(64 << 20)]
    if data is not None:
        cmd += ["-d", data]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_reflection_lists_the_public_service_through_envoy(envoy_address):
    out = grpcurl(envoy_address, "list")
    assert out.returncode == 0, out.stderr
    assert "vibevoice.tts.v1.TextToSpeech" in out.stdout.split()
    assert "grpc.health.v1.Health" in out.stdout.split()


def test_every_service_reports_serving_health(mesh):
    for service in ("text_parser", "acoustic", "llm", "gateway", "envoy"):
        port = mesh.ports.envoy if service == "envoy" else mesh.port(service)
        out = grpcurl(f"127.0.0.1:{port}", "grpc.health.v1.Health/Check")
        assert out.returncode == 0, (service, out.stderr)
        assert json.loads(out.stdout)["status"] == "SERVING", service


def test_grpcurl_synthesizes_a_script_through_envoy(envoy_address):
    request = {
        "text": (SCRIPTS / "2p_short.txt").read_text(),
        "format": "AUDIO_FORMAT_PCM16",
        "options": {"seed": "7", "fixedFrames": 5},
    }
    out = grpcurl(envoy_address, "vibevoice.tts.v1.TextToSpeech/Synthesize", data=json.dumps(request))
    assert out.returncode == 0, out.stderr
    events = [json.loads(chunk) for chunk in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    header = next(e["header"] for e in events if "header" in e)
    assert header["randomWeights"] is True and header["sampleRate"] == 24000
    audio = [e["audio"] for e in events if "audio" in e]
    assert [int(a.get("frameIndex", 0)) for a in audio] == list(range(5))
    assert sum(len(base64.b64decode(a["data"])) for a in audio) == 5 * 3200 * 2
    summary = events[-1]["summary"]
    assert int(summary["frames"]) == 5 and summary["finishReason"] == "fixed_frames"


def test_grpcurl_takes_an_mp3_voice(envoy_address):
    """A voice recorded as MP3, the format people most often have, sent as a user would."""
    samples, rate = sf.read(VOICES / "en-Carter_man.wav", dtype="float32")
    mp3 = io.BytesIO()
    sf.write(mp3, samples[: 3 * rate], rate, format="MP3")
    request = {
        "text": "Speaker 1: Hello from a voice in an MP3 file.",
        "voices": [{"speaker": 1, "audio": base64.b64encode(mp3.getvalue()).decode()}],
        "format": "AUDIO_FORMAT_PCM16",
        "options": {"seed": "7", "fixedFrames": 3},
    }
    out = grpcurl(envoy_address, "vibevoice.tts.v1.TextToSpeech/Synthesize", data=json.dumps(request))
    assert out.returncode == 0, out.stderr
    events = [json.loads(chunk) for chunk in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert int(events[-1]["summary"]["frames"]) == 3


def test_each_gpu_service_holds_only_its_own_weights(mesh):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.llm}") as ch:
        llm = mesh_pb2_grpc.LLMStub(ch).DescribeModel(mesh_pb2.LLMDescribeModelRequest()).info
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.acoustic}") as ch:
        acoustic = mesh_pb2_grpc.AcousticStub(ch).DescribeModel(mesh_pb2.AcousticDescribeModelRequest()).info

    from safetensors import safe_open

    with safe_open(str(Path(llm.model) / "model.safetensors"), framework="pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118

    def total(prefixes: tuple[str, ...]) -> int:
        n = 0
        for k, shape in sizes.items():
            if k.startswith(prefixes):
                count = 1
                for d in shape:
                    count *= d
                n += count
        return n

    lm_params = total(("model.language_model.",))
    acoustic_params = total(
        (
            "model.audio_tower.",
            "model.semantic_tokenizer_encoder.",
            "model.diffusion_head.",
            "model.multi_modal_projector.",
            "model.semantic_connector.",
            "model.latent_scaling_factor",
            "model.latent_bias_factor",
        )
    )
    head_rows = 4 * sizes["model.language_model.norm.weight"][0]
    assert llm.parameters == lm_params + head_rows
    assert acoustic.parameters == acoustic_params
    assert not any(m.startswith(("model.audio_tower", "model.diffusion_head")) for m in llm.modules)
    assert not any(m.startswith("model.language_model") for m in acoustic.modules)
    assert llm.random_weights and acoustic.random_weights


def test_structured_turns_equal_the_same_script_as_text(envoy_address):
    from vibevoice.tts.v1 import tts_pb2

    from services.client import build_request, synthesize

    text = (SCRIPTS / "2p_short.txt").read_text()
    as_text = build_request(text, {}, tts_pb2.AUDIO_FORMAT_PCM_F32, seed=11, fixed_frames=3)
    as_turns = tts_pb2.SynthesizeRequest(
        turns=tts_pb2.Script(
            turns=[
                tts_pb2.Turn(speaker=int(line.split(":")[0].split()[1]), text=line.split(":", 1)[1])
                for line in text.splitlines()
                if line.strip()
            ]
        ),
        format=tts_pb2.AUDIO_FORMAT_PCM_F32,
        options=tts_pb2.GenerationOptions(seed=11, fixed_frames=3),
    )
    a, b = synthesize(envoy_address, as_text, timeout=120), synthesize(envoy_address, as_turns, timeout=120)
    assert a.header.prompt_tokens == b.header.prompt_tokens
    assert [s.speaker for s in b.header.speakers] == [1, 2]
    assert a.data == b.data and len(a.data) == 3 * 3200 * 4

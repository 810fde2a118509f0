"""The core promise: the mesh's audio equals transformers' generate() for the same inputs and seed."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from vibevoice.tts.v1 import tts_pb2

from services.client import build_request, synthesize
from services.common.reference import load_reference, reference_audio
from tests.conftest import SCRIPTS, VOICES

FRAMES = 12
SEED = 1234
SYSTEM = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each"
    " respective speaker.\n"
)


def reference_prompt(tokenizer, config, script: str, voice_frames: list[int]) -> list[int]:
    """MODEL.md's prompt layout, written out independently of the text_parser service."""

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    ids = tok(SYSTEM)
    if voice_frames:
        ids += tok(" Voice input:\n")
        for k, n in enumerate(voice_frames):
            ids += tok(f" Speaker {k}:") + [config.audio_bos_token_id] + [config.audio_token_id] * n
            ids += [config.audio_eos_token_id] + tok("\n")
    ids += tok(" Text input:\n")
    for line in script.splitlines():
        if line.strip():
            speaker, text = line.split(":", 1)
            ids += tok(f" Speaker {int(speaker.split()[1]) - 1}: {text.strip()}\n")
    return ids + tok(" Speech output:\n") + [config.audio_bos_token_id]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import AutoTokenizer

    model = load_reference(tiny_checkpoint)
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("with_voices", [True, False], ids=["voices", "no-voices"])
def test_mesh_audio_equals_reference(envoy_address, reference, with_voices):
    model, tokenizer = reference
    script = (SCRIPTS / "2p_short.txt").read_text()
    files = {1: VOICES / "en-Carter_man.wav", 2: VOICES / "en-Maya_woman.wav"} if with_voices else {}
    request = build_request(
        script,
        {s: p.read_bytes() for s, p in files.items()},
        tts_pb2.AUDIO_FORMAT_PCM_F32,
        seed=SEED,
        fixed_frames=FRAMES,
    )
    result = synthesize(envoy_address, request, timeout=300)
    mesh_audio = np.frombuffer(result.data, dtype="<f4")

    voices = [sf.read(files[s], dtype="float32")[0] for s in sorted(files)]
    prompt = reference_prompt(tokenizer, model.config, script, [-(-len(v) // 3200) for v in voices])
    expected = reference_audio(model, prompt, voices, SEED, FRAMES)

    assert result.header.random_weights
    assert result.header.prompt_tokens == len(prompt)
    assert result.summary.frames == FRAMES and result.summary.finish_reason == "fixed_frames"
    assert [c.frame_index for c in result.chunks] == list(range(FRAMES))
    assert mesh_audio.shape == expected.shape == (FRAMES * 3200,)
    rms = float(np.sqrt(np.mean(expected**2)))
    assert 0.05 < rms < 0.5, f"the tiny model must make clearly audible audio, RMS {rms}"
    peak = float(np.abs(expected).max())
    worst = float(np.abs(mesh_audio - expected).max())
    print(
        f"\nparity ({'voices' if with_voices else 'no voices'}): max |mesh - reference| = {worst:.3g}, "
        f"{worst / peak:.3g} of the reference's peak {peak:.3f} (RMS {rms:.3f})"
    )
    assert worst < 1e-4 * peak


@pytest.fixture(scope="module")
def local_mesh(tiny_checkpoint, tmp_path_factory):
    """The llm hosting the acoustic engine in its own process: one GPU, no hop."""
    from services.mesh import Mesh
    from tests.conftest import new_ports

    mesh = Mesh(
        ports=new_ports(),
        model=str(tiny_checkpoint),
        device="cpu",
        dtype="float32",
        acoustic="local",
        allow_fixed_frames=True,
        log_dir=tmp_path_factory.mktemp("local-mesh-logs"),
    )
    with mesh:
        yield mesh


def test_in_process_acoustic_gives_the_same_audio(local_mesh, envoy_address):
    script = (SCRIPTS / "2p_short.txt").read_text()
    voices = {1: (VOICES / "en-Carter_man.wav").read_bytes()}
    request = build_request(script, voices, tts_pb2.AUDIO_FORMAT_PCM_F32, seed=99, fixed_frames=6)
    local = synthesize(f"127.0.0.1:{local_mesh.ports.envoy}", request, timeout=300)
    remote = synthesize(envoy_address, request, timeout=300)
    assert "acoustic" not in local_mesh.processes
    a, b = np.frombuffer(local.data, "<f4"), np.frombuffer(remote.data, "<f4")
    assert a.shape == b.shape == (6 * 3200,)
    assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()

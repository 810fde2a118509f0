"""The core promise: the mesh's audio equals transformers' generate() for the same inputs and seed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf
from vibevoice.tts.v1 import tts_pb2

from services.client import build_request, synthesize
from services.common.reference import load_reference, reference_audio, reference_generate
from tests.conftest import SCRIPTS, VOICES
from tests.prompts import reference_prompt

FRAMES = 12
SEED = 1234
SCRIPT = (SCRIPTS / "2p_short.txt").read_text()
VOICE_FILES = {1: VOICES / "en-Carter_man.wav", 2: VOICES / "en-Maya_woman.wav"}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import AutoTokenizer

    model = load_reference(tiny_checkpoint)
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("with_voices", [True, False], ids=["voices", "no-voices"])
def test_mesh_audio_equals_reference(envoy_address, reference, with_voices):
    model, tokenizer = reference
    script = SCRIPT
    files = VOICE_FILES if with_voices else {}
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


def own_decisions(reference, with_voices: bool, seed: int) -> tuple[tts_pb2.SynthesizeRequest, np.ndarray, list[int]]:
    """A request with no fixed_frames, and the reference's audio and segment of every frame for it."""
    model, tokenizer = reference
    files = VOICE_FILES if with_voices else {}
    request = build_request(
        SCRIPT, {s: p.read_bytes() for s, p in files.items()}, tts_pb2.AUDIO_FORMAT_PCM_F32, seed=seed
    )
    voices = [sf.read(files[s], dtype="float32")[0] for s in sorted(files)]
    prompt = reference_prompt(tokenizer, model.config, SCRIPT, [-(-len(v) // 3200) for v in voices])
    audio, tokens = reference_generate(model, prompt, voices, seed)
    cfg, segment, segments = model.config, 0, []
    for t in tokens:
        segment += t == cfg.audio_bos_token_id
        if t == cfg.audio_token_id:
            segments.append(segment)
    assert tokens[-1] == cfg.eos_token_id, "the model must end the script itself"
    return request, audio, segments


def assert_same_stream(result, audio: np.ndarray, segments: list[int]) -> None:
    ours = np.frombuffer(result.data, dtype="<f4")
    assert result.summary.finish_reason == "eos"
    assert [c.frame_index for c in result.chunks] == list(range(len(segments)))
    assert [c.segment_index for c in result.chunks] == segments
    assert ours.shape == audio.shape
    assert np.abs(ours - audio).max() < 1e-4 * np.abs(audio).max()


@pytest.mark.parametrize(("with_voices", "seed"), [(False, 0), (True, 1)], ids=["no-voices", "voices"])
def test_the_model_decides_through_the_mesh(envoy_address, reference, with_voices, seed):
    """No fixed_frames: the llm's own choices (speech, audio_eos, audio_bos, eos) equal generate()'s."""
    request, audio, segments = own_decisions(reference, with_voices, seed)
    assert segments[-1] >= 1, "the checkpoint must speak in several segments"
    assert_same_stream(synthesize(envoy_address, request, timeout=300), audio, segments)


def test_the_model_decides_inside_a_batch(envoy_address, reference):
    """Streams that join at other times are at other points of their own segments; each equals its reference."""
    # the first speaks 43 frames in 6 segments; the others join while it is mid-segment
    cases = [own_decisions(reference, True, 2), own_decisions(reference, False, 0), own_decisions(reference, True, 1)]
    results: list = [None] * len(cases)

    def one(i: int) -> None:
        time.sleep(0.2 * i)
        results[i] = synthesize(envoy_address, cases[i][0], metadata=[("x-api-key", f"batch-{i}")], timeout=300)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result, (_, audio, segments) in zip(results, cases, strict=True):
        assert_same_stream(result, audio, segments)


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


def test_max_audio_seconds_stops_a_model_that_goes_on(envoy_address, reference):
    """A model that would speak longer stops at the request's limit, and says so."""
    request, audio, segments = own_decisions(reference, False, 4)
    assert len(segments) > 4
    request.options.max_audio_seconds = 0.5  # 4 frames at 7.5 per second
    result = synthesize(envoy_address, request, timeout=300)
    ours = np.frombuffer(result.data, dtype="<f4")
    assert result.summary.finish_reason == "max_audio_seconds"
    assert ours.shape == (4 * 3200,)
    assert np.abs(ours - audio[: 4 * 3200]).max() < 1e-4 * np.abs(audio).max()

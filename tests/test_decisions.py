"""The model decides: every token the engine chooses, and the audio, equal transformers' generate().

The tiny checkpoint's special-token rows make its own argmax speak in segments (speech, audio_eos, audio_bos,
more speech, eos), so these tests cover every decision with no forcing, alone and in a batch whose streams
are at other points of their own segments; the limits that stop a model which never says eos; and a stream
whose model never speaks, which must end instead of spinning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from vibevoice.mesh.v1 import mesh_pb2

from services.acoustic.engine import AcousticEngine
from services.common import stream_size
from services.common.checkpoint import resolve_checkpoint
from services.common.reference import load_reference, reference_generate
from services.common.tiny_model import build_tiny_checkpoint
from services.llm import scheduler as scheduler_module
from services.llm.engine import (
    FINISH_CONTEXT,
    FINISH_EOS,
    FINISH_MAX_FRAMES,
    FINISH_MAX_NEW_TOKENS,
    LMEngine,
    LMStream,
)
from services.llm.piece_graphs import PieceGraphs
from services.llm.scheduler import Failed, Finished, Frame, Job, Scheduler, StillWorking
from services.render.local import LocalLink
from services.render.values import StreamSpec
from services.text_parser.server import TextParser
from tests.conftest import SCRIPTS, VOICES
from tests.piece_stages import use_piece_stages
from tests.prompts import reference_prompt

SCRIPT = (SCRIPTS / "2p_short.txt").read_text()


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint), AutoTokenizer.from_pretrained(tiny_checkpoint)


def letters(config, tokens: list[int]) -> str:
    names = {config.audio_token_id: "s", config.audio_eos_token_id: "E", config.audio_bos_token_id: "B"}
    return "".join(names.get(t, "X" if t == config.eos_token_id else "?") for t in tokens)


def run(
    ckpt,
    requests: list[dict],
    max_streams: int = 8,
    max_context: int | None = None,
    piece_stages: bool = False,
    **engine,
) -> list[dict]:
    """Run requests through the scheduler (staggered by `after` steps); each one's tokens, frames and finish.
    `piece_stages`: whole prompt pieces go through the piece graphs' stages (`tests/piece_stages.py`)."""

    async def main():
        lm = LMEngine(ckpt, max_streams=max_streams, max_context=max_context, **engine)
        if piece_stages:
            use_piece_stages(lm)
        scheduler = Scheduler(lm, LocalLink(AcousticEngine(ckpt, max_streams=max_streams)))
        tokens: dict[int, list[int]] = {}
        mixed_steps = []
        accept = lm.accept

        def recording_accept(decisions, embeddings):
            for d in decisions:
                tokens.setdefault(id(d.stream), []).append(d.token)
            mixed_steps.append(len({d.token for d in decisions}) > 1)
            return accept(decisions, embeddings)

        lm.accept = recording_accept

        async def one(r):
            for _ in range(r.get("after", 0)):  # join a few steps after the others
                await asyncio.sleep(0.05)
            stream = LMStream(
                r["prompt"], r.get("voices"), 0, r.get("max_frames", 10_000), r.get("cfg", 1.3), r.get("expected", 0)
            )
            spec = StreamSpec(scheduler.new_stream_id(), r["seed"], r.get("cfg", 1.3), 10, *r.get("voice_shape", ()))
            job = Job(stream, spec)
            scheduler.submit(job)
            frames, segments, alive = [], [], 0
            while True:
                event = await asyncio.wait_for(job.events.get(), 120)
                alive += isinstance(event, StillWorking)
                if isinstance(event, Frame):
                    frames.append(event.audio.numpy())
                    segments.append(event.segment)
                elif isinstance(event, Finished):
                    audio = np.concatenate(frames) if frames else np.zeros(0, np.float32)
                    result = {"audio": audio, "segments": segments, "finish": event.reason, "alive": alive}
                    return {**result, "stream": stream}
                elif isinstance(event, Failed):
                    raise AssertionError(event.message)

        results = await asyncio.gather(*(one(r) for r in requests))
        for r in results:
            r["tokens"] = tokens[id(r.pop("stream"))]
        run.engine = lm
        return results, any(mixed_steps)

    return asyncio.run(main())


def expected_segments(config, tokens: list[int]) -> list[int]:
    segment, out = 0, []
    for t in tokens:
        if t == config.audio_bos_token_id:
            segment += 1
        elif t == config.audio_token_id:
            out.append(segment)
    return out


def assert_same(config, ours: dict, audio: np.ndarray, tokens: list[int]) -> None:
    assert letters(config, ours["tokens"]) == letters(config, tokens)
    assert ours["finish"] == FINISH_EOS
    assert ours["segments"] == expected_segments(config, tokens)
    assert ours["audio"].shape == audio.shape
    assert np.abs(ours["audio"] - audio).max() < 1e-4 * np.abs(audio).max()


def no_voice_request(reference, seed: int, **extra) -> dict:
    model, tokenizer = reference
    return {"prompt": reference_prompt(tokenizer, model.config, SCRIPT, []), "seed": seed, **extra}


def test_own_decisions_equal_the_reference_alone(ckpt, reference):
    model, _ = reference
    request = no_voice_request(reference, seed=0)
    audio, tokens = reference_generate(model, request["prompt"], [], 0)
    pattern = letters(model.config, tokens)
    # the model's own choices cover every decision: speech, audio_eos, audio_bos, more speech, eos
    assert "sE" in pattern and "EB" in pattern and "Bs" in pattern and pattern.endswith("sX"), pattern
    ((ours,), _) = run(ckpt, [request])
    assert_same(model.config, ours, audio, tokens)


def voices_case(ckpt, reference) -> tuple[dict, np.ndarray, list[int]]:
    """A request with two voices, and the reference's audio and tokens for it."""
    model, tokenizer = reference
    voices = [sf.read(VOICES / name, dtype="float32")[0] for name in ("en-Carter_man.wav", "en-Maya_woman.wav")]
    frames = [-(-len(v) // 3200) for v in voices]
    prompt = reference_prompt(tokenizer, model.config, SCRIPT, frames)
    audio, tokens = reference_generate(model, prompt, voices, 1)
    assert "EB" in letters(model.config, tokens)
    # the voice prompts as the acoustic service encodes them, seeded as the request is
    acoustic = AcousticEngine(ckpt)
    embeddings, voice_frames = acoustic.encode_voices([torch.as_tensor(v) for v in voices], 1)
    assert voice_frames == frames
    request = {"prompt": prompt, "seed": 1, "voices": embeddings, "voice_shape": (2, max(frames))}
    return request, audio, tokens


def test_own_decisions_with_voices(ckpt, reference):
    request, audio, tokens = voices_case(ckpt, reference)
    ((ours,), _) = run(ckpt, [request])
    assert_same(reference[0].config, ours, audio, tokens)


def test_own_decisions_with_voices_through_the_piece_graphs_stages(ckpt, reference, monkeypatch):
    """The prompt, voices included, prefilled in whole pieces through the piece graphs' stages (and its last
    positions in chunks, both padded as the GPU's graphs are): the model's own decisions and audio equal the
    reference's."""
    request, audio, tokens = voices_case(ckpt, reference)
    starts: list[int] = []
    piece = PieceGraphs.run
    monkeypatch.setattr(PieceGraphs, "run", lambda self, start: starts.append(start) or piece(self, start))
    ((ours,), _) = run(ckpt, [request], piece_stages=True, prefill_chunk=16, idle_prefill_chunks=4)
    pieces = (len(request["prompt"]) - 1) // 64
    assert pieces >= 2 and starts == [64 * k for k in range(pieces)]
    assert_same(reference[0].config, ours, audio, tokens)


@pytest.fixture(scope="module")
def other_shapes(tmp_path_factory):
    """A checkpoint of other shapes than the tests' (`tiny_config("tiny-other")`) and its reference, its weights
    in several files with an index, as published checkpoints are."""
    path = build_tiny_checkpoint(
        tmp_path_factory.mktemp("other-shapes") / "ckpt", shape="tiny-other", max_shard_size="20MB"
    )
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) >= 2
    return resolve_checkpoint(str(path)), (load_reference(path), AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("with_voices", [False, True], ids=["no-voices", "voices"])
def test_own_decisions_on_a_checkpoint_of_other_shapes(other_shapes, with_voices):
    """Grouped query heads of 24 lanes, an untied head, three diffusion layers, kernel-5 convolutions, sharded
    weights: the engine's page tables, attention and acoustic state are sized from the checkpoint, not from the tests'
    model, and each service reads its own tensors from whichever file holds them."""
    ckpt, reference = other_shapes
    model = reference[0]
    if with_voices:
        request, audio, tokens = voices_case(ckpt, reference)
    else:
        request = no_voice_request(reference, seed=3)
        audio, tokens = reference_generate(model, request["prompt"], [], 3)
    assert "EB" in letters(model.config, tokens), "the checkpoint must speak in several segments"
    ((ours,), _) = run(ckpt, [request])
    assert_same(model.config, ours, audio, tokens)


def test_own_decisions_inside_a_batch_at_other_points(ckpt, reference):
    """Neighbours join at other steps and make other choices in the same steps; nobody's audio changes."""
    model, _ = reference
    requests = [
        no_voice_request(reference, seed=0),
        no_voice_request(reference, seed=2, after=2),
        no_voice_request(reference, seed=4, after=5, cfg=2.0),
        no_voice_request(reference, seed=3, after=1),
    ]
    results, mixed = run(ckpt, requests)
    assert mixed, "some step must hold different decisions, or the batch proves nothing"
    for request, ours in zip(requests, results, strict=True):
        audio, tokens = reference_generate(
            model, request["prompt"], [], request["seed"], cfg_scale=request.get("cfg", 1.3)
        )
        assert_same(model.config, ours, audio, tokens)


def test_the_checkpoints_max_new_tokens_ends_a_stream_where_generate_ends(tiny_checkpoint, reference, tmp_path):
    """A generation config that sets max_new_tokens (converted checkpoints do): generate() stops after that many
    tokens, speech or not, and so does the stream, with the same tokens and audio up to there."""
    model, _ = reference
    request = no_voice_request(reference, seed=0)
    _, full = reference_generate(model, request["prompt"], [], 0)
    speech = [i for i, t in enumerate(full) if t == model.config.audio_token_id]
    cap = speech[-2] + 1  # the last token made is speech (its frame is the reference's last), before its own eos
    assert cap < len(full) - 1
    path = tmp_path / "capped"
    shutil.copytree(tiny_checkpoint, path)
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": cap}))
    audio, tokens = reference_generate(load_reference(path), request["prompt"], [], 0, max_new_tokens=None)
    assert tokens == full[:cap]
    capped = resolve_checkpoint(str(path))
    ((ours,), _) = run(capped, [request])
    assert ours["finish"] == FINISH_MAX_NEW_TOKENS
    assert letters(model.config, ours["tokens"]) == letters(model.config, tokens) + "X"
    assert ours["audio"].shape == audio.shape
    assert np.abs(ours["audio"] - audio).max() < 1e-4 * np.abs(audio).max()
    # The frames a request may make, as the header reports them, count the cap too.
    parsed = TextParser(capped).parse(mesh_pb2.ParseRequest(text=SCRIPT))
    assert parsed.max_new_frames == cap < 8192 - len(parsed.prompt_ids)


def test_a_model_that_never_says_eos_stops_at_the_frame_budget(ckpt, reference):
    model, _ = reference
    request = no_voice_request(reference, seed=4, max_frames=5)  # the model alone speaks 14 frames
    audio, tokens = reference_generate(model, request["prompt"], [], 4)
    assert letters(model.config, tokens).count("s") > 5
    ((ours,), _) = run(ckpt, [request])
    assert ours["finish"] == FINISH_MAX_FRAMES
    assert ours["audio"].shape == (5 * 3200,)
    assert np.abs(ours["audio"] - audio[: 5 * 3200]).max() < 1e-4 * np.abs(audio).max()


@pytest.fixture(scope="module")
def silent_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with the special rows that random initialization tends to give: audio_bos forever."""
    path = tmp_path_factory.mktemp("silent") / "tiny"
    shutil.copytree(tiny_checkpoint, path)
    cfg = resolve_checkpoint(str(tiny_checkpoint)).config
    weights = load_file(path / "model.safetensors")
    embed = weights["model.language_model.embed_tokens.weight"]
    bos = embed[cfg.audio_bos_token_id].clone()
    for token in (cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id):
        embed[token] = 0.0
    embed[cfg.audio_bos_token_id] = 50 * bos / bos.norm()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return resolve_checkpoint(str(path))


def test_a_stream_that_never_speaks_ends_at_the_context_and_does_not_hang(silent_checkpoint, reference, monkeypatch):
    model, tokenizer = reference
    prompt = reference_prompt(tokenizer, model.config, SCRIPT, [])
    monkeypatch.setattr(scheduler_module, "KEEPALIVE_S", 0.0)  # say it is alive at every silent step
    ((ours,), _) = run(silent_checkpoint, [{"prompt": prompt, "seed": 0}], max_context=len(prompt) + 40)
    assert ours["finish"] == FINISH_CONTEXT
    assert ours["audio"].size == 0
    assert set(letters(model.config, ours["tokens"][:-1])) == {"B"}
    # a silent stream still sends something, so no proxy on the way takes it for a dead one
    assert ours["alive"] >= len(ours["tokens"]) - 2


def test_a_full_kv_pool_swaps_a_stream_out_and_its_audio_does_not_change(ckpt, reference, monkeypatch, caplog):
    """Pages of 4 positions and a pool that holds the three streams' prompts and their small reservations but
    not all they grow to: the scheduler swaps streams to host memory and back. Every stream still makes the
    reference's tokens and audio, and the pool ends as it began."""
    model, _ = reference
    caplog.set_level(logging.INFO, logger="services.llm.engine")
    monkeypatch.setattr(stream_size, "TURN_TOKENS", 0)  # reserve no room to grow: each stream outgrows its own
    requests = [no_voice_request(reference, seed=s, expected=1) for s in (0, 2, 3)]
    prompt = len(requests[0]["prompt"])
    reserved = -(-(prompt + 1) // 4) + 2  # what admission reserves for each: the prompt and one frame
    results, _ = run(ckpt, requests, page_size=4, kv_pages=1 + 3 * reserved + 2)
    engine = run.engine
    swaps = sum("swapped to host memory" in r.getMessage() for r in caplog.records)
    assert swaps > 0 and engine.preemptions >= swaps
    assert sum("swapped back in" in r.getMessage() for r in caplog.records) == swaps
    for request, ours in zip(requests, results, strict=True):
        audio, tokens = reference_generate(model, request["prompt"], [], request["seed"])
        assert_same(model.config, ours, audio, tokens)
    assert len(engine.blocks.free) == engine.blocks.usable and engine.blocks.reserved == 0

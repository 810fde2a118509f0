"""The batched engine in one process: batching, chunked prefill and slot reuse never change a stream's audio."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from services.acoustic.engine import AcousticEngine
from services.common.checkpoint import resolve_checkpoint
from services.common.frames import SAMPLES_PER_FRAME
from services.common.reference import load_reference, reference_audio
from services.llm import decoder as decoder_module
from services.llm.engine import LMEngine, LMStream
from services.llm.piece_graphs import Launched, PieceGraphs
from services.llm.scheduler import Failed, Finished, Frame, Job, Scheduler
from services.render.local import LocalLink
from services.render.values import RenderStep, StreamSpec
from tests.piece_stages import use_piece_stages


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(str(tiny_checkpoint))


def prompt(ckpt, text_tokens: int, seed: int) -> list[int]:
    """A prompt of the reference's shape: some text tokens, then audio_bos."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(100, 50000, (text_tokens,), generator=g).tolist()
    return body + [ckpt.config.audio_bos_token_id]


def run(
    ckpt,
    requests: list[dict],
    max_streams: int = 8,
    prefill_chunk: int = 512,
    device: str = "cpu",
    padded_chunks: bool = False,
    budget: int | None = -1,
    graph_replays: list[tuple[int, int]] | None = None,
    piece_stages: bool = False,
    **engine_options,
) -> list[np.ndarray]:
    """Run requests through the scheduler together; returns each one's audio. `budget`: prompt tokens a step
    (-1: one chunk; None: the engine's own, as the server runs it). `graph_replays`: stand in for the GPU's chunk
    and piece graphs with the same padded steps run eagerly, listing their replays as (queries, prompt tokens).
    `piece_stages`: whole pieces go through the piece graphs' own stages and buffers, each stage called instead
    of replayed."""

    async def main():
        lm = LMEngine(ckpt, device, max_streams=max_streams, prefill_chunk=prefill_chunk, **engine_options)
        lm.padded_chunks = lm.padded_chunks or padded_chunks
        if graph_replays is not None:

            def replay(queries: int):
                graph_replays.append((queries, int(lm.chunk_tokens)))
                keys = lm._keys(int(lm.chunk_start) + int(lm.chunk_tokens))
                lm._chunk_step(queries, keys, padded=True)

            lm.padded_chunks = True
            lm.chunk_graph = SimpleNamespace(replay=lambda: replay(lm.prefill_chunk))
            lm.piece_graph = SimpleNamespace(run=lambda start: replay(lm.piece_tokens))
        if piece_stages:
            use_piece_stages(lm)
        acoustic = AcousticEngine(ckpt, device, max_streams=max_streams)
        scheduler = Scheduler(lm, LocalLink(acoustic), prefill_chunk if budget == -1 else budget)
        jobs = []
        for r in requests:
            stream = LMStream(
                prompt_ids=r["prompt"],
                voice_embeddings=None,
                fixed_frames=r["frames"],
                max_frames=10_000,
                cfg_scale=r.get("cfg", 1.3),
            )
            spec = StreamSpec(scheduler.new_stream_id(), r["seed"], r.get("cfg", 1.3), r.get("steps", 10))
            job = Job(stream, spec)
            scheduler.submit(job)
            jobs.append(job)

        async def collect(job):
            frames = []
            while True:
                event = await job.events.get()
                if isinstance(event, Frame):
                    frames.append(event.audio.cpu().numpy())
                elif isinstance(event, Finished):
                    return np.concatenate(frames)
                elif isinstance(event, Failed):
                    raise AssertionError(event.message)

        return await asyncio.gather(*(collect(j) for j in jobs))

    return asyncio.run(main())


def test_engine_matches_reference_at_batch_one(ckpt):
    ids = prompt(ckpt, 40, seed=1)
    (ours,) = run(ckpt, [{"prompt": ids, "frames": 6, "seed": 11}])
    expected = reference_audio(load_reference(ckpt.path), ids, [], 11, 6)
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()


def test_audio_is_the_same_alone_and_in_a_batch(ckpt):
    target = {"prompt": prompt(ckpt, 50, seed=2), "frames": 8, "seed": 21}
    others = [
        {"prompt": prompt(ckpt, 30, seed=3), "frames": 3, "seed": 31, "cfg": 2.0},  # leaves early
        {"prompt": prompt(ckpt, 90, seed=4), "frames": 12, "seed": 41, "steps": 5},  # other step count
        {"prompt": prompt(ckpt, 20, seed=5), "frames": 8, "seed": 51},
        {"prompt": prompt(ckpt, 70, seed=6), "frames": 10, "seed": 61},
    ]
    (alone,) = run(ckpt, [target])
    together = run(ckpt, [others[0], others[1], target, others[2], others[3]])
    worst = float(np.abs(alone - together[2]).max())
    print(f"\nalone vs in a batch of 5: max difference {worst:.3g}")
    assert worst < 1e-5
    # and the neighbours are different audio, so the comparison could have failed
    assert np.abs(together[3][: len(alone)] - alone).max() > 0.01


def test_chunked_prefill_and_slot_reuse_keep_the_audio(ckpt):
    target = {"prompt": prompt(ckpt, 300, seed=7), "frames": 5, "seed": 71}
    (whole,) = run(ckpt, [target])
    # two slots for three streams: the third waits, then takes a freed slot; prompts arrive 64 tokens a step
    chunked = run(
        ckpt,
        [{"prompt": prompt(ckpt, 10, seed=8), "frames": 2, "seed": 81}, dict(target), dict(target)],
        max_streams=2,
        prefill_chunk=64,
    )
    assert np.abs(chunked[1] - whole).max() < 1e-5
    assert np.abs(chunked[2] - whole).max() < 1e-5


def test_padded_prompt_chunks_give_the_audio_of_exact_ones(ckpt):
    """The padded step the GPU's chunk graph captures (each chunk padded to 256 queries; keys gathered here, where
    the graph reads them through the page table), run eagerly, against chunks of exactly their tokens: prompts
    over several chunks, one ending inside a chunk, two streams prefilled in the same steps, and a third arriving
    while they play."""
    requests = [
        {"prompt": prompt(ckpt, 700, 21), "frames": 6, "seed": 1},
        {"prompt": prompt(ckpt, 90, 22), "frames": 6, "seed": 2},
        {"prompt": prompt(ckpt, 300, 23), "frames": 4, "seed": 3},
    ]
    exact = run(ckpt, requests, max_streams=2, prefill_chunk=256)
    padded = run(ckpt, requests, max_streams=2, prefill_chunk=256, padded_chunks=True)
    for a, b in zip(exact, padded, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_prompts_with_nothing_playing_replay_the_piece_graph_and_the_rest_the_chunk_graph(ckpt):
    """With the server's budget, a step with no stream playing replays the graph of a whole piece (several
    chunks) while a piece's worth of prompt is left, and chunks after that; steps beside playing streams replay
    the chunk graph. The audio is that of exact chunks either way. The third stream waits for the second's
    slot, so its prompt arrives while the first plays."""
    requests = [
        {"prompt": prompt(ckpt, 700, 21), "frames": 10, "seed": 1},
        {"prompt": prompt(ckpt, 90, 22), "frames": 3, "seed": 2},  # leaves while the first plays on
        {"prompt": prompt(ckpt, 300, 23), "frames": 4, "seed": 3},
    ]
    exact = run(ckpt, requests, max_streams=2, prefill_chunk=128)
    replays: list[tuple[int, int]] = []
    mixed = run(
        ckpt, requests, max_streams=2, prefill_chunk=128, budget=None, graph_replays=replays, idle_prefill_chunks=2
    )
    # (queries, tokens): the first prompt's 700 positions alone, as two pieces and then chunks; the second's 90,
    # 68 in that step's budget and the rest once the first plays; the third's 300 beside the first.
    assert replays == [(256, 256), (256, 256), (128, 128), (128, 60), (128, 68), (128, 22)] + [
        (128, 128),
        (128, 128),
        (128, 44),
    ]
    for a, b in zip(exact, mixed, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_pieces_through_the_piece_graphs_stages_give_the_audio_of_exact_chunks(ckpt, monkeypatch):
    """The piece graphs' stages (graph 0, then the rest of one layer and the next up to attention, attention
    launched between them through the static buffers), run as plain calls: the audio of exact chunks. Each
    prompt takes two pieces, at their own starts, and its last positions in chunks (the second after the first
    has finished); a stage that read a stale buffer or another start would change it."""
    requests = [
        {"prompt": prompt(ckpt, 700, 21), "frames": 5, "seed": 1},
        {"prompt": prompt(ckpt, 600, 22), "frames": 5, "seed": 2},
    ]
    exact = run(ckpt, requests, max_streams=1, prefill_chunk=128)
    starts: list[int] = []
    piece = PieceGraphs.run
    monkeypatch.setattr(PieceGraphs, "run", lambda self, start: starts.append(start) or piece(self, start))
    staged = run(
        ckpt, requests, max_streams=1, prefill_chunk=128, budget=None, piece_stages=True, idle_prefill_chunks=2
    )
    assert starts == [0, 256, 0, 256]
    for a, b in zip(exact, staged, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_the_piece_graphs_stages_equal_the_launched_piece_at_every_layer(ckpt):
    """A piece at a later start through the stages and static buffers against the same piece launched whole:
    the same keys and values in every layer and the same final hidden states (a residual stream not carried
    from one stage to the next changes the latter)."""
    lm = LMEngine(ckpt, "cpu", max_streams=1, prefill_chunk=16, idle_prefill_chunks=2)
    tokens, start = lm.piece_tokens, 24
    lm.kv.page_table[0, :] = torch.arange(1, lm.kv.max_pages + 1, dtype=torch.int32) % lm.kv.k[0].shape[1]
    g = torch.Generator().manual_seed(5)
    earlier = torch.randn(start, lm.hidden, generator=g)
    lm._write_chunk(earlier, 0, 0, None)  # the keys before the piece
    inputs = torch.randn(tokens, lm.hidden, generator=g)
    lm.chunk_inputs[:tokens] = inputs
    lm.chunk_row.fill_(0)
    lm.chunk_start.fill_(start)
    lm.chunk_tokens.fill_(tokens)
    saved = [(k.clone(), v.clone()) for k, v in zip(lm.kv.k, lm.kv.v, strict=True)]
    launched = lm._chunk_step(tokens, start + tokens).clone()
    launched_kv = [(k.clone(), v.clone()) for k, v in zip(lm.kv.k, lm.kv.v, strict=True)]
    for (k, v), (sk, sv) in zip(zip(lm.kv.k, lm.kv.v, strict=True), saved, strict=True):
        k.copy_(sk)
        v.copy_(sv)
    graphs = PieceGraphs(lm.decoder, lm.chunk_inputs[None, :tokens], lm.chunk_row, lm.chunk_start, Launched)
    lm.chunk_inputs[:tokens] = inputs  # the stages' calls while they were made wrote over the buffers
    staged = graphs.run(start)
    for (k, v), (lk, lv) in zip(zip(lm.kv.k, lm.kv.v, strict=True), launched_kv, strict=True):
        torch.testing.assert_close(k, lk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, lv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(staged, launched, rtol=1e-5, atol=1e-5)


def test_a_long_pieces_mlp_in_slices_equals_the_whole_and_leaves_its_input_alone(ckpt, monkeypatch):
    """A launched piece's MLP runs `MLP_TOKENS` tokens at a time, adding into the layer's residual in place: the
    same hidden states as the MLP over the whole piece, a last slice shorter than the others included, and the
    layer's input unchanged."""
    lm = LMEngine(ckpt, "cpu", max_streams=1)
    dec, layer = lm.decoder, lm.lm.layers[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 37, lm.hidden, generator=g)
    out = torch.randn(1, dec.q_size // dec.head_dim, 37, dec.head_dim, generator=g)
    before = x.clone()
    monkeypatch.setattr(decoder_module, "MLP_TOKENS", 1_000)
    whole = dec.after_attention(layer, dec.gate_up[1], x, out)
    monkeypatch.setattr(decoder_module, "MLP_TOKENS", 8)
    sliced = dec.after_attention(layer, dec.gate_up[1], x, out)
    assert torch.equal(x, before)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-parts", "compiled-parts"])
def test_captured_prompt_chunks_give_the_audio_of_launched_ones(ckpt, compiled):
    """Prompt chunks and pieces replayed as graphs (the Triton kernel reading the page table) against the same
    prompts launched (gathered keys, SDPA): prompts over several chunks, one ending inside a chunk, two streams
    prefilled in the same steps, the first prompt's first two pieces of two chunks each. Two different attention
    kernels sum in different orders, so the bound is rounding of bf16 (a step of 3.9e-3), not the bit-level
    agreement of one kernel: on an H100 the first frame differed by 6.0e-4 of the peak and the six frames by
    6.6e-4 (chunks alone). A wrong page, position or mask differs by the signal itself. `compiled`: the graphs'
    layer parts compiled, as `vvmesh up` runs them."""
    requests = [
        {"prompt": prompt(ckpt, 700, 21), "frames": 6, "seed": 1},
        {"prompt": prompt(ckpt, 90, 22), "frames": 6, "seed": 2},
    ]
    launched = run(ckpt, requests, prefill_chunk=256, device="cuda", prefill_graphs=False)
    captured = run(
        ckpt,
        requests,
        prefill_chunk=256,
        device="cuda",
        prefill_graphs=True,
        budget=None,
        idle_prefill_chunks=2,
        torch_compile=compiled,
    )
    for a, b in zip(launched, captured, strict=True):
        assert a.shape == b.shape
        peak = np.abs(a).max()
        assert np.abs(a - b).max() <= 2e-3 * peak


def test_a_voice_encoded_in_passes_equals_the_voice_in_one_pass(ckpt):
    """The σ-VAE encoder is causal: taking a voice in passes through its streaming cache (the service's pass
    length is a tuning knob, bench/voice_encode.py) gives the latents of the whole voice at once, as the
    reference's processor encodes it, including a last pass shorter than the others."""
    engine = AcousticEngine(ckpt, max_streams=1)
    g = torch.Generator().manual_seed(5)
    voice = 0.3 * torch.randn(int(7.5 * SAMPLES_PER_FRAME), generator=g)  # 7.5 frames: a padded last frame
    engine.voice_chunk_samples = 8 * SAMPLES_PER_FRAME
    whole = engine._voice_mean(voice)
    for frames in (1, 3):
        engine._voice_means.clear()
        engine.voice_chunk_samples = frames * SAMPLES_PER_FRAME
        parts = engine._voice_mean(voice)
        assert parts.shape == whole.shape == (8, engine.latent_size)
        assert (parts - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_streams_keep_their_state_when_rows_are_repacked(ckpt):
    """A step that renders only some streams moves them to the leading rows (where the CUDA graphs run);
    every stream's convolution state, guidance scale and noise generator go with it."""
    engine = AcousticEngine(ckpt, max_streams=4)
    for i in range(4):
        engine.start(StreamSpec(i, seed=i, cfg_scale=1.0 + i, diffusion_steps=10))
    for store in (engine.decoder_state, engine.semantic_state):
        for t in store.state.values():
            for row in range(4):
                t[row] = float(engine.order[row])  # each row holds its stream's id
    generators = {sid: engine.streams[sid].generator for sid in range(4)}

    speaking = [engine.streams[3], engine.streams[1]]
    engine._speakers_first(speaking)

    assert sorted(st.row for st in speaking) == [0, 1]
    for sid, state in engine.streams.items():
        assert engine.order[state.row] == sid
        assert state.generator is generators[sid]
        assert engine.cfg_rows[state.row].item() == 1.0 + sid
        for store in (engine.decoder_state, engine.semantic_state):
            for t in store.state.values():
                assert torch.all(t[state.row] == sid)


def test_a_stream_that_ends_without_rendering_frees_its_row_before_the_step(ckpt):
    engine = AcousticEngine(ckpt, max_streams=2)
    hidden = engine.hidden_size
    engine.step(RenderStep(starts=[StreamSpec(1, 1, 1.3, 10), StreamSpec(2, 2, 1.3, 10)]))
    # stream 1 finished (eos); stream 3 joins and stream 2 renders, all in one message of a full engine
    zeros = torch.zeros(1, hidden)
    result = engine.step(RenderStep(0, [StreamSpec(3, 3, 1.3, 10)], [2], zeros, zeros, [1]))
    assert result.audio.shape == (1, 3200)
    assert sorted(engine.streams) == [2, 3]


def test_a_stream_with_another_step_count_does_not_take_its_batch_off_the_usual_step(ckpt, monkeypatch):
    """Two streams at the usual 10 diffusion steps and one at 5: the two go through the bucket step (the one the
    GPU's graphs replay; the CPU calls it as it is), and only the third renders apart."""
    engine = AcousticEngine(ckpt, max_streams=4)
    for sid, steps in ((1, 10), (2, 5), (3, 10)):
        engine.start(StreamSpec(sid, seed=sid, cfg_scale=1.3, diffusion_steps=steps))
    buckets, leading = [], []
    bucket_step, render_leading = engine._bucket_step, engine._render_leading
    monkeypatch.setattr(engine, "_bucket_step", lambda n: buckets.append(n) or bucket_step(n))
    monkeypatch.setattr(
        engine, "_render_leading", lambda states, *a: leading.append(len(states)) or render_leading(states, *a)
    )
    conditions = torch.randn(3, engine.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds, audio = engine.render([1, 2, 3], conditions, conditions.flip(0))
    assert leading == [2] and buckets == [2]
    assert embeds.shape == (3, engine.hidden_size) and audio.shape == (3, 3200)
    assert torch.isfinite(audio).all() and audio.abs().amax(dim=1).min() > 0

"""The fused ConvNeXt block kernel equals `convnext_step`, the block's own math: its output and the state it leaves,
for frames longer and shorter than the state, tiles that split a frame, inputs that are views, and rows of a
larger state tensor."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.models.vibevoice_acoustic_tokenizer.configuration_vibevoice_acoustic_tokenizer import (
    VibeVoiceAcousticTokenizerConfig,
)
from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
    VibeVoiceAcousticTokenizerConvNext1dLayer,
)

from services.acoustic import convnext_kernel
from services.acoustic.engine import AcousticEngine
from services.acoustic.streaming import convnext_step
from services.common.checkpoint import resolve_checkpoint
from tests.acoustic_frames import frames_both_ways

needs_kernel = pytest.mark.skipif(
    convnext_kernel.triton is None or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the fused block kernel needs Triton, on a GPU or with TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_block(channels: int, seed: int, dtype: torch.dtype, **config_changes) -> torch.nn.Module:
    config = VibeVoiceAcousticTokenizerConfig(num_filters=channels, **config_changes)
    block = VibeVoiceAcousticTokenizerConvNext1dLayer(config, hidden_size=channels, layer_idx=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # layer scales of 1e-6 would hide the mixer and the FFN
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return block.to(DEVICE, dtype).eval()


@needs_kernel
@pytest.mark.parametrize(
    ("channels", "samples", "streams", "changes"),
    [
        (16, 1, 3, {}),
        (32, 4, 2, {}),
        (16, 6, 1, {}),
        (32, 50, 2, {}),
        (64, 33, 1, {}),
        (16, 200, 1, {}),
        # Another checkpoint's shapes: an FFN of 3x (its hidden layer not a multiple of the slice), a shorter
        # convolution (a state of 2 samples, longer and shorter than the frame).
        (32, 40, 2, {"ffn_expansion": 3}),
        (16, 1, 2, {"kernel_size": 3}),
        (16, 20, 1, {"kernel_size": 3, "ffn_expansion": 2}),
    ],
)
@pytest.mark.parametrize("tiles", [None, convnext_kernel.BlockTiles(1024, 1)], ids=["default-tiles", "small-tiles"])
def test_fused_block_equals_the_blocks_math(channels: int, samples: int, streams: int, changes: dict, tiles):
    block = random_block(channels, seed=channels + samples, dtype=torch.float32, **changes)
    pad = block.mixer.conv.kernel_size[0] - 1
    g = torch.Generator().manual_seed(samples)
    wide = torch.randn(streams, channels, samples + 3, generator=g).to(DEVICE)
    x = wide[:, :, 3:]  # a view, as a resampling conv's trimmed output is
    rows = torch.randn(streams + 2, channels, pad, generator=g).to(DEVICE)
    state, expected_state = rows[1 : streams + 1], rows[1 : streams + 1].clone()
    with torch.inference_mode():
        for _ in range(2):  # the second frame starts from the state the first left
            expected = convnext_step(block, x, expected_state)
            out = convnext_kernel.convnext_block(block, x, state, tiles)
            assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()
            assert torch.allclose(state, expected_state, atol=1e-5), (state - expected_state).abs().max()
            x = x.flip(-1)
    assert rows[0].abs().sum() > 0 and rows[-1].abs().sum() > 0  # neighbours' rows untouched (checked below)


@needs_kernel
def test_fused_block_leaves_other_rows_alone_and_tiles_shrink_for_small_batches():
    block = random_block(32, seed=1, dtype=torch.float32)
    rows = torch.randn(4, 32, 6).to(DEVICE)
    before = rows.clone()
    with torch.inference_mode():
        convnext_kernel.convnext_block(block, torch.randn(2, 32, 20).to(DEVICE), rows[1:3])
    assert torch.equal(rows[0], before[0]) and torch.equal(rows[3], before[3])
    assert not torch.equal(rows[1], before[1])
    # One stream of 3,200 samples is cut into tiles of 16 so that its programs fill the GPU; 256 streams keep
    # the widest tile.
    assert convnext_kernel.tile_for(1, 32, 3200) == 16
    assert convnext_kernel.tile_for(256, 32, 3200) == 256
    assert convnext_kernel.tile_for(256, 256, 200) == 32


def test_the_kernel_takes_only_blocks_whose_math_it_computes():
    assert convnext_kernel.kernel_applies(random_block(32, seed=3, dtype=torch.float32))
    assert convnext_kernel.kernel_applies(random_block(16, seed=3, dtype=torch.float32, hidden_act="gelu_python"))
    # Another activation, a wider or narrower stage, a dilated or even-sized convolution: the plain block.
    for channels, changes in [
        (32, {"hidden_act": "gelu_new"}),
        (32, {"hidden_act": "relu"}),
        (128, {}),
        (8, {}),
        (48, {}),
        (32, {"kernel_size": 32}),
    ]:
        assert not convnext_kernel.kernel_applies(random_block(channels, seed=3, dtype=torch.float32, **changes))
    dilated = random_block(32, seed=3, dtype=torch.float32)
    dilated.mixer.conv.dilation = (2,)
    assert not convnext_kernel.kernel_applies(dilated)


def test_blocks_the_kernel_cannot_run_fall_back_to_the_plain_step():
    block = random_block(32, seed=2, dtype=torch.float32).cpu()
    x, state = torch.randn(1, 32, 8), torch.zeros(1, 32, 6)
    calls = []

    def fallback(b, x, s):
        calls.append(x.shape)
        return convnext_step(b, x, s)

    with torch.inference_mode():
        out = convnext_kernel.fused_block_step(fallback)(block, x, state)
    assert calls == [x.shape]  # a CPU tensor: the plain step
    assert out.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available() or convnext_kernel.triton is None, reason="bf16 kernels need a GPU")
@pytest.mark.parametrize(("channels", "samples", "streams"), [(32, 3200, 1), (128, 800, 4), (256, 200, 64)])
def test_fused_block_in_bf16_rounds_as_the_block_does(channels: int, samples: int, streams: int):
    block = random_block(channels, seed=channels, dtype=torch.bfloat16)
    x = torch.randn(streams, channels, samples, device=DEVICE, dtype=torch.bfloat16)
    state = torch.randn(streams, channels, 6, device=DEVICE, dtype=torch.bfloat16)
    expected_state = state.clone()
    with torch.inference_mode():
        expected = convnext_step(block, x, expected_state).float()
        out = convnext_kernel.convnext_block(block, x, state).float()
    # bf16 keeps 8 bits: a few of its steps apart at most, where float32 sums meet bf16 roundings in another order
    assert (out - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.allclose(state.float(), expected_state.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or convnext_kernel.triton is None, reason="needs a GPU")
def test_a_frame_through_fused_blocks_equals_the_plain_frame(tiny_checkpoint, monkeypatch):
    """The engine's frame (diffusion, σ-VAE decode, semantic encode, connectors) with the fused kernel at every
    stage it takes (16-64 channels in the tiny model) against the plain blocks, in float32, from the same state;
    the states left behind agree too. cuDNN's float32 convolutions (the resampling layers between stages) round
    their inputs to TF32 by default, which turns the kernel's float32 rounding into differences of 3e-4 of the
    signal (measured on an H100); here they run in full float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    engine = AcousticEngine(resolve_checkpoint(str(tiny_checkpoint)), "cuda", torch.float32, 3, cuda_graphs=False)
    engine._compiled_block = convnext_kernel.fused_block_step(convnext_step)
    results = frames_both_ways(engine, 3)
    for plain, fused in zip(*results, strict=True):
        assert torch.allclose(plain, fused, atol=1e-4, rtol=1e-4), (plain - fused).abs().max()

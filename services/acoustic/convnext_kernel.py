"""One ConvNeXt block of the sigma-VAE decoder or the semantic encoder as one Triton kernel.

`convnext_step` (services/acoustic/streaming.py) runs a block as about ten kernels: the norm, the causal
depthwise convolution with its state, the layer scale and residual, the FFN norm, two matmuls with the GELU
between them, and the second layer scale and residual. At one stream those kernels are too small to be anything
but their own latency.

Here a program takes a tile of one stream's samples, all channels: it normalizes the seven shifted windows the
depthwise convolution reads (the first tile takes the samples before the frame from the block's state), applies
the layer scale and residual, and runs the FFN with its hidden layer kept on chip, a slice of hidden channels
at a time. The activations come from DRAM once and go back once (the taps' overlapping windows come from
cache). The program of the first tile, the only one that reads the state, writes the new state after it has read
the old.

The roundings are the module's: the normalized activations, the mixer's residual sum, the FFN's input, its
first layer, its GELU and its output are each rounded to the activations' dtype, and every sum in between is
float32.

Measured on an H100 (`bench/acoustic_parts.py`, 1.5B): at the 32- and 64-channel stages (3,200 and 1,600 samples
a frame) it takes the decode and encode stacks from 1.28 and 1.27 ms to 1.20 and 1.19 ms at one stream, and
equals the compiled blocks at 64 and 256 streams. At 128 and 256 channels it is slower than the compiled blocks
with many streams (every program reads the whole FFN, 16 x channels^2 bytes, for a tile of a few dozen samples),
so those stages keep them.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.activations import GELUActivation

from services.acoustic.streaming import BlockStep

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton; they run `convnext_step`
    triton = None

MAX_CHANNELS = 64  # wider stages keep the compiled blocks (measured: see above)
MIN_TILE = 16  # tl.dot's smallest side
HIDDEN_SLICE = 64  # FFN hidden channels per inner step
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 or H200: smaller tiles until a batch has as many


@dataclasses.dataclass(frozen=True)
class BlockTiles:
    """The kernel's launch shape: the most samples x channels a program holds (its float32 tiles stay in
    registers), and its warps (None: 4 up to 4,096 elements, 8 above). Fewer warps keep a sample's channels, which
    every norm sums over, within fewer warps; `bench/acoustic_parts.py` times the shapes."""

    elements: int = 8192
    warps: int | None = None


TILES = BlockTiles()  # read at each launch, so a benchmark can try others


def kernel_applies(block: torch.nn.Module) -> bool:
    """Whether the kernel computes this block's math: the tokenizer's ConvNeXt block with a causal depthwise
    convolution of stride and dilation 1 (its state shorter than a tile), biases, layer scales and the exact
    (erf) GELU, at 16 to MAX_CHANNELS channels, a power of two. A checkpoint with anything else keeps the plain
    block."""
    conv, ffn = block.mixer.conv, block.ffn
    channels = conv.in_channels
    return (
        MIN_TILE <= channels <= MAX_CHANNELS
        and channels & (channels - 1) == 0
        and conv.groups == conv.out_channels == channels
        and conv.stride[0] == 1
        and conv.dilation[0] == 1
        and conv.padding == (0,)
        and 1 <= conv.kernel_size[0] <= MIN_TILE + 1
        and conv.bias is not None
        and isinstance(ffn.activation, GELUActivation)
        and ffn.linear1.bias is not None
        and ffn.linear2.bias is not None
        and isinstance(block.gamma, torch.Tensor)
        and isinstance(block.ffn_gamma, torch.Tensor)
        # the kernel indexes the weights as dense row-major tensors
        and all(w.is_contiguous() for w in (conv.weight, ffn.linear1.weight, ffn.linear2.weight))
    )


def _fits(block: torch.nn.Module, x: torch.Tensor, state: torch.Tensor) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.shape[1] == block.mixer.conv.in_channels
        and state.shape[-1] == block.mixer.conv.kernel_size[0] - 1
        and kernel_applies(block)
    )


def tile_for(streams: int, channels: int, samples: int, elements: int | None = None) -> int:
    """Samples a program holds: as many as its tiles allow (`elements`, default TILES'), no more than the frame
    has, and fewer while the batch would have too few programs to fill the GPU."""
    elements = elements or TILES.elements
    tile = max(MIN_TILE, min(elements // channels, triton.next_power_of_2(samples)))
    while tile > MIN_TILE and streams * triton.cdiv(samples, tile) < TARGET_PROGRAMS:
        tile //= 2
    return tile


def fused_block_step(fallback: BlockStep) -> BlockStep:
    """A block step that runs the fused kernel where it applies (a CUDA tensor, a stage of 16 to MAX_CHANNELS
    channels) and `fallback` elsewhere."""

    def step(block: torch.nn.Module, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if not _fits(block, x, state):
            return fallback(block, x, state)
        return convnext_block(block, x, state)

    return step


def convnext_block(
    block: torch.nn.Module, x: torch.Tensor, state: torch.Tensor, tiles: BlockTiles | None = None
) -> torch.Tensor:
    """`convnext_step(block, x, state)` in one launch: x (n, channels, T) -> (n, channels, T); state (n, channels,
    kernel - 1) is updated in place."""
    n, channels, samples = x.shape
    conv, ffn = block.mixer.conv, block.ffn
    hidden = ffn.linear1.weight.shape[0]
    tiles = tiles or TILES
    tile = tile_for(n, channels, samples, tiles.elements)
    warps = tiles.warps or (4 if tile * channels <= 4096 else 8)
    out = torch.empty((n, channels, samples), device=x.device, dtype=x.dtype)
    _block_kernel[(n, triton.cdiv(samples, tile))](
        x,
        state,
        out,
        block.norm.weight,
        conv.weight,
        conv.bias,
        block.gamma,
        block.ffn_norm.weight,
        ffn.linear1.weight,
        ffn.linear1.bias,
        ffn.linear2.weight,
        ffn.linear2.bias,
        block.ffn_gamma,
        samples,
        block.norm.variance_epsilon,
        block.ffn_norm.variance_epsilon,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        CHANNELS=channels,
        HIDDEN=hidden,
        TAPS=conv.kernel_size[0],
        TILE=tile,
        SLICE=min(HIDDEN_SLICE, triton.next_power_of_2(hidden)),
        PAD_TILE=triton.next_power_of_2(max(1, state.shape[-1])),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps,
    )
    return out


if triton is not None:

    @triton.jit
    def _rms(x, weight, eps, CHANNELS: tl.constexpr, DTYPE: tl.constexpr):
        """The tokenizer's RMS norm over the channels of (samples, channels) float32: rounded to the activations'
        dtype, then times the weight (rounded again), returned as float32."""
        variance = tl.sum(x * x, 1) / CHANNELS
        normed = (x * tl.rsqrt(variance + eps)[:, None]).to(DTYPE).to(tl.float32)
        return (normed * weight[None, :]).to(DTYPE).to(tl.float32)

    @triton.jit
    def _block_kernel(
        x_ptr,
        state_ptr,
        out_ptr,
        norm_w,
        conv_w,
        conv_b,
        gamma_ptr,
        ffn_norm_w,
        w1_ptr,
        b1_ptr,
        w2_ptr,
        b2_ptr,
        ffn_gamma_ptr,
        samples,
        eps,
        ffn_eps,
        sx_n,
        sx_c,
        sx_t,
        ss_n,
        ss_c,
        ss_t,
        CHANNELS: tl.constexpr,
        HIDDEN: tl.constexpr,
        TAPS: tl.constexpr,
        TILE: tl.constexpr,
        SLICE: tl.constexpr,
        PAD_TILE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        PAD: tl.constexpr = TAPS - 1
        dtype = out_ptr.dtype.element_ty
        row = tl.program_id(0)
        first = tl.program_id(1) * TILE
        t = first + tl.arange(0, TILE)
        c = tl.arange(0, CHANNELS)
        x_row = x_ptr + row * sx_n
        s_row = state_ptr + row * ss_n
        norm_weight = tl.load(norm_w + c).to(tl.float32)

        # The causal depthwise convolution over the normalized input, the state before the frame's first sample.
        mixed = tl.zeros((TILE, CHANNELS), dtype=tl.float32)
        for j in tl.static_range(TAPS):
            s = t + j - PAD
            inside = (s >= 0) & (s < samples)
            xs = tl.load(x_row + s[:, None] * sx_t + c[None, :] * sx_c, mask=inside[:, None], other=0.0)
            h = _rms(xs.to(tl.float32), norm_weight, eps, CHANNELS, dtype)
            before = s < 0
            held = tl.load(s_row + (s + PAD)[:, None] * ss_t + c[None, :] * ss_c, mask=before[:, None], other=0.0).to(
                tl.float32
            )
            h = tl.where(before[:, None], held, h)
            mixed += h * tl.load(conv_w + c * TAPS + j).to(tl.float32)[None, :]
        valid = t < samples
        x = tl.load(x_row + t[:, None] * sx_t + c[None, :] * sx_c, mask=valid[:, None], other=0.0).to(tl.float32)
        mixed += tl.load(conv_b + c).to(tl.float32)[None, :]
        x = (x + mixed * tl.load(gamma_ptr + c).to(tl.float32)[None, :]).to(dtype).to(tl.float32)

        # The FFN, its hidden layer a slice at a time.
        h = _rms(x, tl.load(ffn_norm_w + c).to(tl.float32), ffn_eps, CHANNELS, dtype).to(dtype)
        f = tl.zeros((TILE, CHANNELS), dtype=tl.float32)
        for start in tl.static_range(0, HIDDEN, SLICE):
            k = start + tl.arange(0, SLICE)
            used = k < HIDDEN
            w1 = tl.load(w1_ptr + k[None, :] * CHANNELS + c[:, None], mask=used[None, :], other=0.0)
            a = tl.dot(h, w1.to(dtype), input_precision=PRECISION)
            a = (a + tl.load(b1_ptr + k, mask=used, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
            a = (0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))).to(dtype)
            w2 = tl.load(w2_ptr + c[None, :] * HIDDEN + k[:, None], mask=used[:, None], other=0.0)
            f = tl.dot(a, w2.to(dtype), f, input_precision=PRECISION)
        f = (f + tl.load(b2_ptr + c).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        out = x + f * tl.load(ffn_gamma_ptr + c).to(tl.float32)[None, :]
        tl.store(out_ptr + row * CHANNELS * samples + c[None, :] * samples + t[:, None], out, mask=valid[:, None])

        if first == 0:
            # The new state: the last PAD samples of the padded input (state, then this frame's normalized input).
            p = tl.arange(0, PAD_TILE)
            u = samples + p
            kept = (p < PAD) & (u < PAD)  # a frame shorter than the state keeps the state's later samples
            fresh = (p < PAD) & (u >= PAD)
            # (names of their own: Triton wants a name to keep its shape across the branch)
            old = tl.load(s_row + u[:, None] * ss_t + c[None, :] * ss_c, mask=kept[:, None], other=0.0)
            tail = tl.load(x_row + (u - PAD)[:, None] * sx_t + c[None, :] * sx_c, mask=fresh[:, None], other=0.0)
            tail_normed = _rms(tail.to(tl.float32), norm_weight, eps, CHANNELS, dtype)
            new = tl.where(kept[:, None], old.to(tl.float32), tail_normed)
            tl.debug_barrier()  # every read of the old state (the taps' and these) is done before it is overwritten
            tl.store(s_row + p[:, None] * ss_t + c[None, :] * ss_c, new, mask=(p < PAD)[:, None])

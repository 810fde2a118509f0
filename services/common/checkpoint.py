"""Finding a VibeVoice checkpoint and loading the part of its weights one process owns.

Each GPU service loads only its own modules: the checkpoint's safetensors are read by key prefix, so the llm
process never materializes acoustic weights and the acoustic process never materializes the language model.
The modules themselves are transformers' VibeVoice classes, built from the checkpoint's own config.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from services.common.errors import CheckpointError
from services.common.frames import SAMPLE_RATE, SAMPLES_PER_FRAME
from services.common.tiny_model import TINY_MARKER, ensure_tiny_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: object  # transformers.VibeVoiceConfig
    random_weights: bool

    @functools.cached_property
    def max_new_tokens(self) -> int | None:
        """The tokens generate() makes at most for this checkpoint (its generation config's cap; converted
        checkpoints set 40,500 for 1.5B), or None: no cap but the context."""
        return generation_config(self).max_new_tokens


def resolve_checkpoint(model: str) -> Checkpoint:
    """`tiny` builds (once) and loads the random-weight test model; anything else is a checkpoint directory."""
    from transformers import VibeVoiceConfig

    path = ensure_tiny_checkpoint() if model == "tiny" else Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a VibeVoice checkpoint directory (no config.json)")
    check_layout(path)
    try:
        config = VibeVoiceConfig.from_pretrained(path)
    except Exception as e:  # transformers' validation raises its own types (huggingface_hub's, ValueError, ...)
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{path}/config.json is not a VibeVoice config transformers can read: {reason}") from e
    check_config(path, config)
    random_weights = bool(getattr(config, TINY_MARKER, False))
    if random_weights:
        log.warning("model %s has RANDOM WEIGHTS: its audio is noise-like and its stop decisions meaningless", path)
    return Checkpoint(path=path, config=config, random_weights=random_weights)


def check_layout(path: Path) -> None:
    """Refuse, from config.json as written, what transformers would read into a VibeVoiceConfig of defaults (a
    Qwen2 config, say) or fail on with a validation error (the original VibeVoice code's layout)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json cannot be read as JSON: {e}") from e
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind != "vibevoice":
        raise CheckpointError(f"{path} holds a {kind!r} checkpoint, not a VibeVoice one")
    if "decoder_config" in raw or "acoustic_tokenizer_config" in raw:
        raise CheckpointError(
            f"{path} is in the layout of Microsoft's original VibeVoice code (decoder_config, "
            "acoustic_tokenizer_config); the mesh loads transformers' layout, e.g. vibevoice/VibeVoice-1.5B-hf"
        )


def check_config(path: Path, config) -> None:
    """Refuse a checkpoint the mesh cannot serve, at start-up rather than as wrong audio later: every service
    assumes the model's audio clock (frames of 3200 samples at 24 kHz) and attention over the whole context."""
    if getattr(config.text_config, "use_sliding_window", False):
        raise CheckpointError(f"{path}: text_config.use_sliding_window is set; the llm attends over the whole context")
    for name in ("audio_config", "semantic_model_config"):
        ratios = getattr(config, name).downsampling_ratios
        samples = math.prod(ratios)
        if samples != SAMPLES_PER_FRAME:
            raise CheckpointError(
                f"{path}: {name}.downsampling_ratios {list(ratios)} make frames of {samples} samples; the mesh "
                f"serves VibeVoice's {SAMPLES_PER_FRAME}-sample frames ({SAMPLE_RATE} Hz audio, "
                f"{SAMPLE_RATE / SAMPLES_PER_FRAME:g} frames a second)"
            )


def generation_config(ckpt: Checkpoint):
    """The generation config the reference model gets from `from_pretrained`: the checkpoint's
    generation_config.json, or, where it has none, one made from its config (the default noise scheduler then)."""
    from transformers import GenerationConfig

    if (ckpt.path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(ckpt.path)
    return GenerationConfig.from_model_config(ckpt.config)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def read_tensors(ckpt: Checkpoint, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor whose name starts with one of `prefixes` (names kept whole)."""
    out: dict[str, torch.Tensor] = {}
    for file in _weight_files(ckpt.path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefixes):
                    out[key] = f.get_tensor(key)
    return out


def load_module(
    factory, tensors: dict[str, torch.Tensor], prefix: str, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Build `factory()` without allocating its weights, then fill it with `tensors[prefix + '.' + name]`."""
    with init_empty_weights(include_buffers=False):
        module = factory()
    state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def parameter_count(modules: dict[str, nn.Module | torch.Tensor]) -> int:
    total = 0
    for m in modules.values():
        total += m.numel() if isinstance(m, torch.Tensor) else sum(p.numel() for p in m.parameters())
    return total

"""Shared pieces of the GPU benchmarks: checkpoints, prompts, timing."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "gen" / "python"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

FRAMES = 200
SCRIPT = (
    "Speaker 1: Welcome back to the show, today we talk about long-form speech.\nSpeaker 2: Thanks, happy to be here."
)


def out_dir() -> Path:
    out = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def checkpoint_path(shape: str) -> Path:
    """Where the random-weight checkpoint of `shape` is kept between runs."""
    return Path(os.environ.get("VVMESH_BENCH_CKPT", "/tmp/vvmesh-bench")) / shape


def checkpoint(shape: str) -> Path:
    from services.common.tiny_model import build_tiny_checkpoint

    path = checkpoint_path(shape)
    if not (path / "config.json").exists():
        t = time.perf_counter()
        # The tiny model is calibrated on the CPU; the full-size shapes are built on the GPU.
        build_tiny_checkpoint(
            path,
            shape,
            device="cpu" if shape == "tiny" else "cuda",
            dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
        print(f"built {shape} random-weight checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
        torch.cuda.empty_cache()
    return path


@functools.cache
def _prompt_builder(path: Path):
    from transformers import AutoTokenizer

    from services.common.checkpoint import resolve_checkpoint
    from services.text_parser.prompt import PromptBuilder, SpecialTokens

    cfg = resolve_checkpoint(str(path)).config
    return PromptBuilder(
        AutoTokenizer.from_pretrained(path),
        SpecialTokens(cfg.audio_bos_token_id, cfg.audio_eos_token_id, cfg.audio_token_id),
    )


def prompt_ids(path: Path, script: str = SCRIPT) -> list[int]:
    """The prompt the text parser builds for `script` (no voices)."""
    from services.text_parser.script import parse_text

    ids, _ = _prompt_builder(path).build(parse_text(script), {})
    return ids


def save(name: str, data: dict) -> None:
    data["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    data["date"] = time.strftime("%Y-%m-%d")
    (out_dir() / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2), flush=True)


def forced_reference(model, ids: list[int], batch: int = 1):
    """`go(n)`: the reference's `generate()` for `batch` copies of `ids`, forced to speak n frames."""
    from transformers import LogitsProcessorList

    from services.common.reference import ForceFrames

    cfg = model.config
    x = torch.tensor([ids] * batch, device="cuda")
    force = LogitsProcessorList([ForceFrames(len(ids), 0, cfg.audio_token_id, cfg.eos_token_id)])

    def go(n: int):
        force[0].frames = n
        torch.manual_seed(0)
        return model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n + 1,
            guidance_scale=1.3,
            num_diffusion_steps=10,
            logits_processor=force,
        )

    return go


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """GPU time of one replay of a captured graph, after a warm-up replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def gpu_ms(fn, repeats: int = 20) -> float:
    """GPU time of one call of `fn`, after a warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB: the bandwidth a weight read can reach here."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    b.copy_(a)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1000)

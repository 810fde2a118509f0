"""Command-line options shared by the two model-serving services."""

from __future__ import annotations

import argparse

import torch

from services.common.checkpoint import DTYPES


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint directory (transformers format), or 'tiny'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the steps' kernels one by one (cuda)")
    p.add_argument(
        "--no-compile", action="store_true", help="capture eager kernels (skips torch.compile's start-up minutes)"
    )


def resolve_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if args.device == "cuda" else torch.float32

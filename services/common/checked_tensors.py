"""Tensors from internal requests, checked before they reach an engine: INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import torch
from vibevoice.mesh.v1 import mesh_pb2

from services.common.errors import invalid_argument
from services.common.tensors import from_proto


def checked_rows(msg: mesh_pb2.Tensor, field: str, width: int, rows: int | None = None) -> torch.Tensor:
    """A (rows, width) matrix of finite floating-point values; `rows` None: any count, at least one."""
    try:
        t = from_proto(msg)
    except (ValueError, RuntimeError) as e:
        raise invalid_argument(field, f"not a tensor: {e}") from e
    wanted = f"({rows if rows is not None else 'frames'}, {width})"
    if t.dim() != 2 or t.shape[1] != width or (rows is not None and t.shape[0] != rows) or t.shape[0] < 1:
        raise invalid_argument(field, f"shape {tuple(t.shape)}; needs {wanted}")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise invalid_argument(field, "must be finite floating-point values")
    return t

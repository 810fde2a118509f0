"""Tensors on the wire: raw little-endian bytes with a dtype name and a shape (`services/common/wire_arrays.py`
reads and writes the same messages as numpy arrays, for the services that do not import torch)."""

from __future__ import annotations

import torch
from vibevoice.mesh.v1 import mesh_pb2

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {name!r}")
    return dtype


def to_proto(t: torch.Tensor) -> mesh_pb2.Tensor:
    t = t.detach().contiguous().cpu()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return mesh_pb2.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=data)


def from_proto(msg: mesh_pb2.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = dtype_from_name(msg.dtype)
    shape = tuple(msg.shape)
    if not msg.data:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(msg.data), dtype=dtype)
    return flat.reshape(shape).to(device)


# Off only in bench/paged_bench.py --copies, which times the plain copies beside these in one run.
PINNED_COPIES = True


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` (and in `dtype`), queued on the device like a kernel. A plain copy from pageable host
    memory first waits for everything already queued on the device's stream, a pipelined step in flight
    included: from pinned memory the host goes on at once."""
    if PINNED_COPIES and t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)


def device_tensor(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(values, device=device)` without waiting for the device (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)

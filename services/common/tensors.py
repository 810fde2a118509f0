"""Tensors on the wire: raw little-endian bytes with a dtype name and a shape."""

from __future__ import annotations

import numpy as np
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
_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4")}


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


def array_proto(a: np.ndarray) -> mesh_pb2.Tensor:
    """`to_proto` for a numpy array, with no torch call (see `as_numpy`): a request's voices on the gateway."""
    name = next((k for k, v in _NUMPY.items() if v == a.dtype), None)
    if name is None:
        raise ValueError(f"unsupported array dtype {a.dtype}")
    return mesh_pb2.Tensor(dtype=name, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def as_numpy(msg: mesh_pb2.Tensor) -> np.ndarray:
    """A tensor message as a read-only array over its bytes: no copy and no torch call, for the loop that relays
    every stream's frames (each torch call lets other threads take the GIL, and the loop waits to get it back)."""
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        return from_proto(msg).float().numpy()  # bfloat16 has no numpy type
    return np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))


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

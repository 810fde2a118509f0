"""Tensors on the wire: raw little-endian bytes with a dtype name and a shape."""

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


def to_proto(t: torch.Tensor) -> mesh_pb2.Tensor:
    t = t.detach().contiguous().cpu()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return mesh_pb2.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=data)


def from_proto(msg: mesh_pb2.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {msg.dtype!r}")
    shape = tuple(msg.shape)
    if not msg.data:
        return torch.empty(shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(msg.data), dtype=dtype)
    return flat.reshape(shape).to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A GPU tensor's values on the CPU, waiting for them without holding the GIL.

    `tensor.cpu()` blocks inside the copy with the GIL held, which stalls every other Python thread of the
    process (the gRPC event loop delivering audio among them) for as long as the GPU is busy. This copies
    asynchronously into pinned memory and waits on a CUDA event, which releases the GIL while it waits.
    """
    if t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    done.synchronize()
    return host

"""Tensor messages as numpy arrays, with no torch call: the loops that relay every stream's frames (the gateway,
the jobs service) and the client side of a synthesis read and write them here. A torch call lets other threads
take the interpreter lock, and a relaying loop then waits to get it back. The message format is
`services/common/tensors.py`'s."""

from __future__ import annotations

import numpy as np
from vibevoice.mesh.v1 import mesh_pb2

_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4")}


def array_proto(a: np.ndarray) -> mesh_pb2.Tensor:
    """A numpy array as a tensor message."""
    name = next((k for k, v in _NUMPY.items() if v == a.dtype), None)
    if name is None:
        raise ValueError(f"unsupported array dtype {a.dtype}")
    return mesh_pb2.Tensor(dtype=name, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def as_numpy(msg: mesh_pb2.Tensor) -> np.ndarray:
    """A tensor message as an array: a read-only view over its bytes, no copy; bfloat16 (which numpy lacks) as
    float32, exactly (a bfloat16 is the top half of the float32 it stands for)."""
    if msg.dtype == "bfloat16":
        halves = np.frombuffer(msg.data, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(tuple(msg.shape))
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {msg.dtype!r}")
    return np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))

"""CUDA tensors and events that another process on the same GPU can map (CUDA IPC), described in protobuf.

The tensors are shared the way `torch.multiprocessing` shares them (`reduce_tensor` / `rebuild_cuda_tensor`);
the fields its pickling carries travel as explicit protobuf fields instead, so nothing is unpickled from the
network. Those functions' argument order is PyTorch's: if it changes, `share_tensor` raises ValueError and
callers fall back to sending tensors in messages.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor
from vibevoice.mesh.v1 import mesh_pb2

from services.common.tensors import dtype_from_name, dtype_name


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share_tensor(t: torch.Tensor) -> mesh_pb2.SharedTensor:
    """Describes a CUDA tensor for another process; the tensor must stay alive while that process uses it."""
    _, args = reduce_tensor(t)
    (_, size, stride, offset, _, dtype, _, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args  # fmt: skip
    return mesh_pb2.SharedTensor(
        dtype=dtype_name(dtype),
        shape=list(size),
        stride=list(stride),
        offset=offset,
        handle=handle,
        storage_bytes=storage_bytes,
        storage_offset_bytes=storage_offset,
        ref_counter_handle=ref_handle,
        ref_counter_offset=ref_offset,
        event_handle=event_handle or b"",
        event_sync_required=event_sync,
    )


def open_tensor(msg: mesh_pb2.SharedTensor, device: torch.device) -> torch.Tensor:
    """Maps another process's CUDA tensor into this one (same physical GPU; raises if it cannot)."""
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(msg.shape),
        tuple(msg.stride),
        msg.offset,
        torch.UntypedStorage,
        dtype_from_name(msg.dtype),
        device.index if device.index is not None else torch.cuda.current_device(),
        msg.handle,
        msg.storage_bytes,
        msg.storage_offset_bytes,
        False,
        msg.ref_counter_handle,
        msg.ref_counter_offset,
        msg.event_handle or None,
        msg.event_sync_required,
    )


def new_event() -> torch.cuda.Event:
    return torch.cuda.Event(interprocess=True)


def open_event(handle: bytes, device: torch.device) -> torch.cuda.Event:
    return torch.cuda.Event.from_ipc_handle(device, handle)

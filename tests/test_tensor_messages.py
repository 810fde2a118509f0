"""Tensor messages made or read without torch (the gateway's voices and frames) agree with the torch converters,
bit for bit, and refuse what they cannot carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vibevoice.mesh.v1 import mesh_pb2

from services.common.tensors import from_proto, to_proto
from services.common.wire_arrays import array_proto, as_numpy


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64])
def test_an_array_message_reads_back_through_torch_and_numpy(dtype):
    a = (np.arange(24).reshape(2, 3, 4) * 1.5 - 7).astype(dtype)
    msg = array_proto(a)
    assert msg == to_proto(torch.from_numpy(a))  # the same message the torch path makes
    assert np.array_equal(from_proto(msg).numpy(), a)
    view = as_numpy(msg)
    assert view.dtype == a.dtype and view.shape == a.shape and np.array_equal(view, a)


def test_a_bfloat16_message_reads_as_the_float32_torch_makes_of_it_bit_for_bit():
    special = [0.5, -2.0, 3.25, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e38]
    t = torch.cat([torch.tensor(special), torch.randn(1001, generator=torch.Generator().manual_seed(3)) * 1e3])
    t = t.to(torch.bfloat16).reshape(2, -1)
    got, want = as_numpy(to_proto(t)), t.float().numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_unknown_array_and_message_types_are_refused():
    with pytest.raises(ValueError, match="unsupported array dtype"):
        array_proto(np.zeros(3, dtype=np.complex64))
    with pytest.raises(ValueError, match="unsupported tensor dtype 'complex64'"):
        as_numpy(mesh_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8))

"""Tensor messages made or read without torch (the gateway's voices and frames) agree with the torch converters,
bit for bit, and refuse what they cannot carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_a_bfloat16_message_reads_as_float32_and_an_unknown_array_type_is_refused():
    t = torch.tensor([[0.5, -2.0, 3.25]], dtype=torch.bfloat16)
    assert np.array_equal(as_numpy(to_proto(t)), t.float().numpy())
    with pytest.raises(ValueError, match="unsupported array dtype"):
        array_proto(np.zeros(3, dtype=np.complex64))

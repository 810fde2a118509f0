"""Several linear layers that read the same input, run as one matmul.

The weights are concatenated once and each module's own weight (and bias) becomes a view into the
concatenation, so memory is not doubled and the modules keep working on their own.
"""

from __future__ import annotations

import torch
from torch import nn


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the concatenated (weight, bias); split the output with `[m.out_features for m in linears]`."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias

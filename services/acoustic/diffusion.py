"""The diffusion head's velocity with classifier-free guidance, arranged for a whole sampling loop.

`VibeVoiceDiffusionHead.forward` recomputes, at every solver step, everything that depends only on the
condition and the timestep: the condition projection, the timestep embedding, and each layer's adaLN
modulation (a matmul as large as the layer's FFN). For one frame the conditions are fixed and the timesteps
are the plan's, so here those are computed once for all steps, each layer's modulation as one matmul over
every (step, row) pair, and a solver step runs only the parts that depend on the sample. Same modules, same
operations per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from services.acoustic.dpm_solver import DPMSolverPlan
from services.common.fused_linear import fuse_linears


def fuse_head(head: torch.nn.Module) -> None:
    """Each FFN's gate and up projections as one matmul (weights become views; see `fuse_linears`)."""
    for layer in head.layers:
        layer.ffn.gate_up = fuse_linears([layer.ffn.gate_proj, layer.ffn.up_proj])[0]


def guided_velocity(
    head: torch.nn.Module, plan: DPMSolverPlan, condition: torch.Tensor, cfg: torch.Tensor
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """velocity(x, t) for `plan.sample`: x (n, latent) -> v (n, latent), guided by `cfg` (n, 1).

    `condition` is (2n, hidden): the positive conditions, then the negative ones.
    """
    n = cfg.shape[0]
    steps = {s.timestep: i for i, s in enumerate(plan.steps)}
    # built on the device (no host copy, so it can be captured in a CUDA graph)
    timesteps = torch.cat([torch.full((1,), t, device=condition.device, dtype=condition.dtype) for t in steps])
    embedded = head.timestep_proj(head.timestep_embedding(timesteps).to(condition.dtype))  # (steps, hidden)
    c = head.cond_proj(condition)[None] + embedded[:, None]  # (steps, 2n, hidden)
    modulation = [layer.linear(layer.act_fn(c)).chunk(3, dim=-1) for layer in head.layers]
    final = head.final_layer
    final_shift, final_scale = final.linear_1(final.act_fn(c)).chunk(2, dim=-1)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        i = steps[t]
        h = head.noisy_images_proj(torch.cat([x, x], dim=0))
        for layer, (shift, scale, gate) in zip(head.layers, modulation, strict=True):
            ffn = layer.ffn
            gate_proj, up = F.linear(layer.norm(h) * (1 + scale[i]) + shift[i], ffn.gate_up).chunk(2, dim=-1)
            h = h + gate[i] * ffn.down_proj(ffn.act_fn(gate_proj) * up)
        normed = F.rms_norm(h, (h.shape[-1],), eps=final.rms_norm_eps)
        v = final.linear_2(normed * (1 + final_scale[i]) + final_shift[i])
        return v[n:] + cfg * (v[:n] - v[n:])

    return velocity

"""DPM-Solver++(2M) as plain tensor math, with the schedule taken from diffusers.

diffusers' `DPMSolverMultistepScheduler` (the reference's sampler) keeps Python state and builds small tensors
at every step. For a fixed step count the whole update is linear in the sample and the model's data
predictions, so its coefficients are computed once from the scheduler's own sigmas and each step becomes a few
fused tensor operations that CUDA graphs can capture. The solver math runs in float32, as diffusers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SolverStep:
    timestep: float
    # data prediction x0 = alpha * sample - sigma * v   (v-prediction)
    alpha: float
    sigma: float
    # next sample = a * sample + b * x0 + c * previous x0
    a: float
    b: float
    c: float


class DPMSolverPlan:
    def __init__(self, scheduler, steps: int) -> None:
        cfg = scheduler.config
        if cfg.algorithm_type != "dpmsolver++" or cfg.solver_order != 2 or cfg.prediction_type != "v_prediction":
            raise ValueError("the tensor solver covers DPM-Solver++ of order 2 with v-prediction")
        if cfg.solver_type != "midpoint" or cfg.thresholding:
            raise ValueError("the tensor solver covers the midpoint solver type without thresholding")
        scheduler.set_timesteps(num_inference_steps=steps)
        sig = scheduler.sigmas.double()
        alpha = 1.0 / torch.sqrt(sig**2 + 1.0)
        sigma = sig * alpha
        lam = torch.log(alpha) - torch.log(sigma)
        plan = []
        for i, t in enumerate(scheduler.timesteps.tolist()):
            last = i == steps - 1
            first_order = i == 0 or (
                last
                and (cfg.euler_at_final or (cfg.lower_order_final and steps < 15) or cfg.final_sigmas_type == "zero")
            )
            s, n = i, i + 1
            if sigma[n] == 0:  # final sigma zero: the update returns the data prediction itself
                a, b, c = 0.0, 1.0, 0.0
            else:
                h = float(lam[n] - lam[s])
                phi = math.expm1(-h)  # exp(-h) - 1
                a = float(sigma[n] / sigma[s])
                b = -float(alpha[n]) * phi
                c = 0.0
                if not first_order:
                    r0 = float(lam[s] - lam[s - 1]) / h
                    d = -0.5 * float(alpha[n]) * phi / r0
                    b, c = b + d, -d
            plan.append(SolverStep(float(t), float(alpha[s]), float(sigma[s]), a, b, c))
        self.steps = plan

    def sample(self, model, latent: torch.Tensor) -> torch.Tensor:
        """Run the plan: `model(sample, timestep) -> v`, starting from `latent` (noise).

        As in diffusers, the data prediction is formed in the model's dtype, the update in float32, and the
        sample is cast back to the model's dtype after every step.
        """
        x = latent
        previous = None
        for step in self.steps:
            x0 = step.alpha * x - step.sigma * model(x, step.timestep)
            update = step.a * x.float() + step.b * x0.float()
            if step.c:
                update = update + step.c * previous.float()
            previous = x0
            x = update.to(latent.dtype)
        return x

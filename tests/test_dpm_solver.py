"""The tensor DPM-Solver++ equals diffusers' DPMSolverMultistepScheduler for the reference's configuration."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from services.acoustic.dpm_solver import DPMSolverPlan


def reference_config() -> dict:
    return {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


def toy_model(x: torch.Tensor, t: float) -> torch.Tensor:
    # Any smooth function of (sample, timestep) exercises every coefficient.
    return torch.tanh(1.7 * x + 0.001 * t) - 0.3 * x


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
def test_plan_matches_diffusers(steps):
    gen = torch.Generator().manual_seed(steps)
    noise = torch.randn(6, 64, generator=gen)

    scheduler = DPMSolverMultistepScheduler(**reference_config())
    scheduler.set_timesteps(num_inference_steps=steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, float(t)), t, x).prev_sample

    plan = DPMSolverPlan(DPMSolverMultistepScheduler(**reference_config()), steps)
    ours = plan.sample(toy_model, noise)
    assert [s.timestep for s in plan.steps] == [float(t) for t in scheduler.timesteps]
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)


def test_ten_step_schedule_is_the_documented_one():
    plan = DPMSolverPlan(DPMSolverMultistepScheduler(**reference_config()), 10)
    assert [int(s.timestep) for s in plan.steps] == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert plan.steps[0].c == 0 and plan.steps[-1].c == 0  # first and last steps are first order
    assert all(s.c != 0 for s in plan.steps[1:-1])

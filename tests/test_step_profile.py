"""The llm's one-shot step profile: it records the first steps with a prompt chunk under load, then stops."""

from __future__ import annotations

import json

import torch

from services.llm.step_profile import StepProfile


def test_the_first_steps_with_a_chunk_under_load_are_profiled_once(tmp_path):
    profile = StepProfile(str(tmp_path), steps=2, min_playing=2)
    x = torch.randn(32, 32)
    with profile.around(prompt_tokens=300, playing=1):  # too few streams playing
        torch.sin(x)
    with profile.around(prompt_tokens=0, playing=4):  # no prompt chunk
        torch.cos(x)
    assert not list(tmp_path.iterdir())
    with profile.around(prompt_tokens=300, playing=4):
        torch.mm(x, x)
    with profile.around(prompt_tokens=0, playing=0):  # once begun, the following steps count whatever they carry
        torch.tanh(x)
    with profile.around(prompt_tokens=300, playing=4):  # one shot: nothing after the steps asked for
        torch.exp(x)
    table = (tmp_path / "llm-steps.txt").read_text()
    assert "aten::mm" in table and "aten::tanh" in table
    assert "aten::sin" not in table and "aten::cos" not in table and "aten::exp" not in table
    trace = json.loads((tmp_path / "llm-steps.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


def test_a_lone_long_prompt_starts_the_profile_and_shorter_ones_do_not(tmp_path):
    """`--profile-min-playing 0 --profile-min-prompt N`: the first step that prefills a prompt of N tokens or more
    starts it, with nothing playing; a shorter prompt's steps (a warm-up, a ten-minute script) do not."""
    profile = StepProfile(str(tmp_path), steps=1, min_playing=0, min_prompt=10_000)
    x = torch.randn(16, 16)
    with profile.around(prompt_tokens=1_938, playing=0):
        torch.sin(x)
    with profile.around(prompt_tokens=0, playing=0):  # nothing prefilled: no step of a prompt at all
        torch.cos(x)
    assert not list(tmp_path.iterdir())
    with profile.around(prompt_tokens=12_555, playing=0):
        torch.mm(x, x)
    table = (tmp_path / "llm-steps.txt").read_text()
    assert "aten::mm" in table and "aten::sin" not in table and "aten::cos" not in table


def test_without_a_folder_nothing_is_profiled():
    profile = StepProfile(None)
    with profile.around(prompt_tokens=300, playing=100):
        torch.mm(torch.ones(2, 2), torch.ones(2, 2))
    assert profile.left == 0


def test_a_profile_that_cannot_be_written_leaves_the_step_alone(tmp_path, caplog):
    """A diagnostic: a folder that cannot be made is logged, and the step it ended on returns normally."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    profile = StepProfile(str(blocked / "profile"), steps=1, min_playing=1)
    with profile.around(prompt_tokens=300, playing=1):
        done = torch.mm(torch.ones(2, 2), torch.ones(2, 2))
    assert done.sum().item() == 8.0 and profile.left == 0
    assert "not written" in caplog.text

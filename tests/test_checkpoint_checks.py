"""A checkpoint the mesh cannot serve is refused when a service starts, with what is wrong in it."""

from __future__ import annotations

import json
import shutil

import pytest

from services.common.checkpoint import resolve_checkpoint


def edited_config(tiny_checkpoint, tmp_path, edit) -> str:
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", path / "config.json")
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_the_tiny_checkpoint_passes(tiny_checkpoint):
    assert resolve_checkpoint(str(tiny_checkpoint)).config.model_type == "vibevoice"


@pytest.mark.parametrize("part", ["audio_config", "semantic_model_config"])
def test_frames_of_another_size_are_refused(tiny_checkpoint, tmp_path, part):
    def halve(config):
        config[part]["downsampling_ratios"] = [2, 2, 4, 5, 5, 4]

    with pytest.raises(ValueError, match=rf"{part}\.downsampling_ratios .* frames of 1600 samples.*3200"):
        resolve_checkpoint(edited_config(tiny_checkpoint, tmp_path, halve))


def test_a_checkpoint_of_another_model_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "qwen"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(ValueError, match="'qwen2' checkpoint, not a VibeVoice one"):
        resolve_checkpoint(str(path))

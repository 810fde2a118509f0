"""A checkpoint the mesh cannot serve is refused when a service starts, with what is wrong in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.common.checkpoint import resolve_checkpoint
from services.common.errors import CheckpointError
from services.text_parser.prompt import TOKENIZER_PROBE, PromptBuilder


def edited_config(tiny_checkpoint, tmp_path, edit) -> str:
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", path / "config.json")
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def copied_checkpoint(tiny_checkpoint, tmp_path, drop: tuple[str, ...] = ()) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, path, ignore=shutil.ignore_patterns(*drop))
    return path


def test_the_tiny_checkpoint_passes(tiny_checkpoint):
    assert resolve_checkpoint(str(tiny_checkpoint)).config.model_type == "vibevoice"


@pytest.mark.parametrize("part", ["audio_config", "semantic_model_config"])
def test_frames_of_another_size_are_refused(tiny_checkpoint, tmp_path, part):
    def halve(config):
        config[part]["downsampling_ratios"] = [2, 2, 4, 5, 5, 4]

    with pytest.raises(CheckpointError, match=rf"{part}\.downsampling_ratios .* frames of 1600 samples.*3200"):
        resolve_checkpoint(edited_config(tiny_checkpoint, tmp_path, halve))


def test_the_original_codes_layout_is_refused(tiny_checkpoint, tmp_path):
    def original(config):
        config["decoder_config"] = config.pop("text_config")
        config["acoustic_tokenizer_config"] = config.pop("audio_config")

    with pytest.raises(CheckpointError, match="layout of Microsoft's original VibeVoice code"):
        resolve_checkpoint(edited_config(tiny_checkpoint, tmp_path, original))


def test_a_config_that_is_not_json_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "broken"
    path.mkdir()
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json cannot be read as JSON"):
        resolve_checkpoint(str(path))


def test_a_config_transformers_refuses_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    def mismatch(config):
        config["diffusion_head_config"]["hidden_size"] = 32  # the language model's is 64

    with pytest.raises(CheckpointError, match="not a VibeVoice config transformers can read: .*must match"):
        resolve_checkpoint(edited_config(tiny_checkpoint, tmp_path, mismatch))


def test_sliding_window_attention_is_refused(tiny_checkpoint, tmp_path):
    def slide(config):
        config["text_config"].update(use_sliding_window=True, sliding_window=64)

    with pytest.raises(CheckpointError, match="use_sliding_window is set"):
        resolve_checkpoint(edited_config(tiny_checkpoint, tmp_path, slide))


def test_a_checkpoint_of_another_model_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "qwen"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="'qwen2' checkpoint, not a VibeVoice one"):
        resolve_checkpoint(str(path))


def test_without_a_generation_config_the_acoustic_side_uses_the_references_default_scheduler(tiny_checkpoint, tmp_path):
    """from_pretrained gives the reference a generation config made from the model's config when the file is
    missing, and generate() then builds its default scheduler: the acoustic engine starts and plans the same."""
    from services.acoustic.engine import AcousticEngine

    bare = AcousticEngine(
        resolve_checkpoint(str(copied_checkpoint(tiny_checkpoint, tmp_path, ("generation_config.json",))))
    )
    full = AcousticEngine(resolve_checkpoint(str(tiny_checkpoint)))
    assert bare._plan(10).steps == full._plan(10).steps


def test_a_checkpoint_without_its_tokenizer_files_is_refused(tiny_checkpoint, tmp_path):
    """transformers makes a one-token tokenizer of an empty directory, which would turn every script into an
    empty prompt."""
    path = copied_checkpoint(tiny_checkpoint, tmp_path, ("tokenizer*", "vocab.json", "merges.txt"))
    ckpt = resolve_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="makes no ids of .* needs its tokenizer files"):
        PromptBuilder.from_pretrained(path, ckpt.config)
    assert PromptBuilder.from_pretrained(tiny_checkpoint, ckpt.config).count(TOKENIZER_PROBE) > 3


def test_a_tokenizer_whose_ids_the_model_cannot_embed_is_refused(tiny_checkpoint, tmp_path):
    path = copied_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["vocab_size"] = 1000
    (path / "config.json").write_text(json.dumps(config))
    ckpt = resolve_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=r"token id \d+ .* outside the model's vocabulary of 1000"):
        PromptBuilder.from_pretrained(path, ckpt.config)


def test_an_untied_config_without_a_head_is_refused(tiny_checkpoint, tmp_path):
    """transformers would give such a model a randomly initialized head; the llm cannot match that."""
    from services.llm.engine import LMEngine

    path = copied_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no lm_head.weight in its weights, and its config does not tie it"):
        LMEngine(resolve_checkpoint(str(path)), max_streams=2)

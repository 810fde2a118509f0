"""A prompt's embeddings made piece by piece equal the whole prompt's, voices in place, wherever the pieces cut."""

from __future__ import annotations

import pytest
import torch

from services.llm.prefill_plan import PromptEmbeddings

AUDIO = 7  # the placeholder token


@pytest.fixture
def prompt() -> PromptEmbeddings:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(16, 4)
    ids = torch.tensor([1, 2, AUDIO, AUDIO, AUDIO, 3, AUDIO, AUDIO, 4, 5, AUDIO, 6])
    places = [i for i, t in enumerate(ids.tolist()) if t == AUDIO]
    voices = torch.randn(len(places), 4)
    return PromptEmbeddings(ids, embed, places, voices)


def whole(prompt: PromptEmbeddings) -> torch.Tensor:
    """What the reference builds: every token's embedding, the voices scattered over the placeholders."""
    expected = prompt.embed_tokens(prompt.ids).detach().clone()
    expected[prompt.ids == AUDIO] = prompt.voices
    return expected


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 12])
def test_pieces_join_to_the_whole_prompt(prompt, piece):
    joined = torch.cat([prompt[a : a + piece] for a in range(0, len(prompt), piece)])
    assert torch.equal(joined, whole(prompt))
    # the voices are really there: the token embedding of a placeholder differs from its voice
    assert not torch.equal(joined[2], prompt.embed_tokens(torch.tensor(AUDIO)))


def test_the_first_positions_keep_only_their_voices(prompt):
    head = prompt.first(7)
    assert len(head) == 7 and head.places == [2, 3, 4, 6] and head.voices.shape[0] == 4
    assert torch.equal(head[0:7], whole(prompt)[:7])
    assert torch.equal(head[5:7], whole(prompt)[5:7])

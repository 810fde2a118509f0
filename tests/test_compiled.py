"""The regions that `torch.compile` runs on CUDA (inside the captured graphs) compute what the eager code does.

On CUDA they are compiled by default; here they are compiled for the CPU in float32, which checks that each
region compiles as one graph and that the compiled math equals the eager math.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from services.acoustic.engine import AcousticEngine
from services.acoustic.streaming import convnext_step
from services.common.checkpoint import resolve_checkpoint
from services.common.cuda_graphs import compiled
from services.llm import paged_attention
from services.llm.engine import LMEngine
from tests.acoustic_frames import frames_both_ways

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="inductor needs a C++ compiler on the CPU")
# The decode graphs' attention kernel is Triton: on these CPU tensors it runs only in Triton's interpreter (the
# kernel itself is checked on the GPU by tests/test_paged_attention.py).
needs_triton = pytest.mark.skipif(
    not paged_attention.available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the paged decode kernel on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1)",
)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(str(tiny_checkpoint))


def test_compiled_acoustic_frame_equals_eager(ckpt):
    engine = AcousticEngine(ckpt, max_streams=3)
    engine._compiled_diffusion = compiled(engine._diffuse)
    engine._compiled_block = compiled(convnext_step)
    results = frames_both_ways(engine, 3)
    for eager, comp in zip(*results, strict=True):
        assert torch.allclose(eager, comp, atol=1e-5, rtol=1e-4), (eager - comp).abs().max()


@needs_triton
def test_captured_decode_step_equals_the_eager_one_over_the_same_pages(ckpt):
    """The GPU's decode graphs run compiled layers with the paged decode kernel over each row's pages; CPU steps
    gather the rows' keys and run SDPA. Over one page table with scattered pages and rows of different lengths,
    both give the same hidden states and the same choices."""
    engine = LMEngine(ckpt, max_streams=3, max_context=1024)
    engine.decoder.compile()
    g = torch.Generator().manual_seed(1)
    for t in (*engine.kv.k, *engine.kv.v):
        t.copy_(torch.randn(t.shape, generator=g))
    engine.next_inputs.copy_(torch.randn(engine.next_inputs.shape, generator=g))
    engine.token_inputs.copy_(torch.randn(engine.token_inputs.shape, generator=g))
    lengths = [[300, 1, 130], [9, 0, 256], [127, 128, 2]]  # positions written next, per stream and branch
    free = torch.randperm(engine.blocks.usable, generator=g).add(1).tolist()  # pages in no particular order
    updates = []
    for stream, branches in enumerate(lengths):
        for branch, n in enumerate(branches):
            updates += [(3 * stream + branch, i, free.pop()) for i in range(n // 128 + 1)]
    engine.kv.set_pages(updates)
    engine.positions[:3] = torch.tensor(lengths)
    engine.live_rows.fill_(9)  # all three streams decode: every row writes its keys and values
    with torch.inference_mode():
        hidden, logits = engine._decode_rows(3, 512)
        hidden_c, logits_c = engine._decode_rows(3, None, compiled=True)
    assert torch.allclose(hidden, hidden_c, atol=1e-5, rtol=1e-4), (hidden - hidden_c).abs().max()
    assert torch.equal(logits.argmax(-1), logits_c.argmax(-1))
    # The rows really differ: a row that read another row's pages would not match its own eager step.
    assert (hidden[0] - hidden[3]).abs().max() > 1e-3


def test_padding_rows_of_a_fixed_size_batch_do_not_write_into_a_prompt_being_prefilled(ckpt):
    """The GPU's graphs step a whole bucket: with one stream decoding in a bucket of two, the second slot's rows
    are stepped too. That slot holds a prompt still being prefilled, whose positive row already has its pages:
    its keys and values must stay as the prefill wrote them, while the decoding stream's are written."""
    engine = LMEngine(ckpt, max_streams=2, max_context=1024)
    g = torch.Generator().manual_seed(2)
    for t in (*engine.kv.k, *engine.kv.v):
        t.copy_(torch.randn(t.shape, generator=g))
    engine.next_inputs.copy_(torch.randn(engine.next_inputs.shape, generator=g))
    engine.token_inputs.copy_(torch.randn(engine.token_inputs.shape, generator=g))
    ps = engine.blocks.page_size
    engine.kv.set_pages([(0, 0, 1), (1, 0, 2), (2, 0, 3), (3, 0, 7)])  # slot 1's positive row: page 7
    engine.positions[0] = torch.tensor([5, 1, 2])  # slot 1 keeps position 0, as every slot not decoding
    prompt_before = engine.kv.k[0][0][:, 7 * ps : 8 * ps].clone()
    own_before = engine.kv.k[0][0][:, ps + 5].clone()
    engine.live_rows.fill_(3)
    with torch.inference_mode():
        engine._decode_rows(2, 512)
    assert torch.equal(engine.kv.k[0][0][:, 7 * ps : 8 * ps], prompt_before)
    assert not torch.equal(engine.kv.k[0][0][:, ps + 5], own_before)

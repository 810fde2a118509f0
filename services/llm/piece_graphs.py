"""A prompt piece of fixed length as CUDA graphs between its layers' attention (piecewise graphs).

With nothing playing, the llm prefills a lone prompt a piece of several chunks a step. Launched, a piece is
thousands of small kernels (norms, rotary embedding, MLP slices) whose launches cost the host more than the
GPU's work. One graph for the whole piece would need a graph-capturable attention over a length known only at
run time (the Triton kernel the chunk graph replays, which costs more GPU time per token at this length than
SDPA's flash kernel). So the piece is captured in pieces: graph 0 computes what every layer reads (the rotary
embedding, the pool index of each position) and layer 0 up to its attention; graph i (1..L) is the rest of
layer i-1 and layer i up to its attention (the last one the final norm). Attention runs launched between them
(gathered keys, SDPA with a lower-right causal mask), a handful of host calls a layer.

The graphs read and write only static buffers (the residual stream, the queries, the attention output), so
the graphs share one memory pool whose size is one layer's activations, and nothing of them is kept between
replays. `Capture` makes the same stages plain calls where there are no graphs, so a CPU test runs every
stage, buffer and copy the GPU replays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.common.cuda_graphs import CapturedStep
from services.llm.decoder import PagedDecoder

Capture = Callable[[Callable[[], object]], object]  # a stage -> something with .replay()


class Launched:
    """A stage run as it is called: what a capture is where there are no CUDA graphs."""

    def __init__(self, stage: Callable[[], object]) -> None:
        self.stage = stage

    def replay(self) -> object:
        return self.stage()


def graphed(pool) -> Capture:
    return lambda stage: CapturedStep(stage, pool, warmup=1)


class PieceGraphs:
    """Prefill of one row's `tokens` positions from `start` on, for inputs in `x` (1, tokens, hidden): every
    position real (a piece is replayed only when it is whole). `row` (1,) and `start` () are device buffers the
    caller fills before `run`. `compiled`: the layers' parts run as `PagedDecoder.compile` made them, as in the
    decode graphs."""

    def __init__(
        self,
        decoder: PagedDecoder,
        x: torch.Tensor,
        row: torch.Tensor,
        start: torch.Tensor,
        capture: Capture,
        compiled: bool = False,
    ) -> None:
        self.decoder = decoder
        self.parts = decoder.compiled_parts if compiled else None
        self.row = row
        self.tokens = x.shape[1]
        layers = len(decoder.lm.layers)
        heads = decoder.q_size // decoder.head_dim
        self.x = x  # the piece's inputs, then the residual stream between graphs
        self.queries = x.new_empty(1, heads, self.tokens, decoder.head_dim)
        self.attended = torch.empty_like(self.queries)
        self.offsets = torch.arange(self.tokens, device=x.device)
        self.start = start
        self.cos: torch.Tensor | None = None  # made by graph 0, kept for the others
        self.sin: torch.Tensor | None = None
        self.write: torch.Tensor | None = None
        self.stages = [capture(self._first)]
        self.stages += [capture(lambda i=i: self._between(i)) for i in range(1, layers + 1)]

    def _first(self) -> None:
        positions = (self.start + self.offsets)[None]
        cos, sin, write = self.decoder.layer_inputs(self.x, self.row, positions, None)
        if self.cos is None:  # static: the later stages read these tensors
            self.cos, self.sin, self.write = torch.empty_like(cos), torch.empty_like(sin), torch.empty_like(write)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.write.copy_(write)
        self.queries.copy_(self.decoder.enter(0, self.x, self.cos, self.sin, self.write, self.parts))

    def _between(self, i: int) -> None:
        """The rest of layer i-1 and layer i up to its attention; after the last layer, the final norm."""
        x = self.decoder.leave(i - 1, self.x, self.attended, self.parts)
        if i < len(self.decoder.lm.layers):
            self.queries.copy_(self.decoder.enter(i, x, self.cos, self.sin, self.write, self.parts))
            self.x.copy_(x)
        else:
            self.x.copy_(self.decoder.lm.norm(x))

    def run(self, start: int) -> torch.Tensor:
        """The piece at position `start` (what the `start` buffer holds); returns the final-norm hidden states
        (1, tokens, hidden), valid until the next run."""
        decoder = self.decoder
        attend = decoder.prompt_chunk_attention(self.row, start + self.tokens)
        self.stages[0].replay()
        for i, stage in enumerate(self.stages[1:]):
            self.attended.copy_(attend(self.queries, decoder.kv.k[i], decoder.kv.v[i]))
            stage.replay()
        return self.x

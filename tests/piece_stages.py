"""The piece graphs' stages on a CPU: the engine takes whole pieces through them, each stage called instead of
replayed, so tests run the stages and buffers a GPU captures."""

from __future__ import annotations

from services.llm.engine import LMEngine
from services.llm.piece_graphs import Launched, PieceGraphs


def use_piece_stages(lm: LMEngine) -> None:
    lm.padded_chunks = True  # pieces and chunks padded, as where the graphs exist
    inputs = lm.chunk_inputs[None, : lm.piece_tokens]
    lm.piece_graph = PieceGraphs(lm.decoder, inputs, lm.chunk_row, lm.chunk_start, Launched)

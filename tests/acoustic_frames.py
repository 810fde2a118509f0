"""One acoustic frame of an engine run twice from the same convolution state, with the eager and the captured
path's code: what each gives, and the states each leaves."""

from __future__ import annotations

import torch

from services.acoustic.engine import AcousticEngine


def frames_both_ways(engine: AcousticEngine, n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """[(embeddings, audio, latents, semantic, decoder state, semantic state)] with `use_compiled` False, then True:
    n streams, random conditions and noise, guidance 1.3, 1.0, 2.0, ..."""
    g = torch.Generator().manual_seed(seed)
    device = engine.device
    condition = torch.randn(2 * n, engine.hidden_size, generator=g).to(device)
    noise = torch.randn(n, engine.latent_size, generator=g).to(device)
    cfg = torch.tensor([[(1.3, 1.0, 2.0)[i % 3]] for i in range(n)], device=device)
    stores = (engine.decoder_state, engine.semantic_state)
    start = [{k: torch.randn(t.shape, generator=g) for k, t in store.state.items()} for store in stores]
    results = []
    for use_compiled in (False, True):
        for store, state in zip(stores, start, strict=True):
            for k, t in store.state.items():
                t.copy_(state[k])
        with torch.inference_mode():
            frame = engine._frame(
                condition, noise, cfg, engine._plan(10), *(s.leading(n) for s in stores), use_compiled=use_compiled
            )
        after = [torch.cat([t.flatten() for t in s.state.values()]) for s in stores]
        results.append((*frame, *after))
    return results

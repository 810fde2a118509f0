"""On one GPU the llm and a separate acoustic service keep a step's tensors in shared GPU memory (CUDA IPC).

The audio must be what the in-process engine and the over-the-wire path give. Runs only where CUDA is present.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from vibevoice.tts.v1 import tts_pb2

from services.client import build_request, synthesize
from services.mesh import Mesh
from tests.conftest import SCRIPTS, VOICES, new_ports

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_mesh(checkpoint, log_dir, acoustic: str, graphs: bool, llm_args: tuple[str, ...] = ()) -> Mesh:
    kernels = ["--no-compile"] if graphs else ["--no-cuda-graphs"]
    return Mesh(
        ports=new_ports(),
        model=str(checkpoint),
        device="cuda",
        dtype="float32",
        acoustic=acoustic,
        allow_fixed_frames=True,
        max_streams=8,
        llm_args=[*kernels, *llm_args],
        acoustic_args=kernels,
        log_dir=log_dir,
    )


# On a GPU the meshes agree closely, not exactly: which streams share a step depends on when each request
# arrives, GPU matmul kernels differ by batch size, and with graphs each process times cuDNN against native
# convolutions and may keep a different one (TF32 in fp32). That is about 1e-4 of the peak over 12 frames; a
# misplaced row or a step read before it was written would far exceed the bound.
TOLERANCE = 2e-3


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_shared_gpu_memory_gives_the_audio_of_the_other_paths(tiny_checkpoint, tmp_path, graphs):
    script = (SCRIPTS / "2p_short.txt").read_text()
    voices = {1: (VOICES / "en-Carter_man.wav").read_bytes()}
    audio, logs = {}, {}
    for name, acoustic, extra in (
        ("local", "local", ()),
        ("shared", "remote", ()),
        ("wire", "remote", ("--no-shared-gpu-memory",)),
    ):
        logs[name] = tmp_path / name
        with cuda_mesh(tiny_checkpoint, logs[name], acoustic, graphs, extra) as mesh:
            # three streams at once, so the shared buffers carry more than one row
            address = f"127.0.0.1:{mesh.ports.envoy}"

            def run(seed: int, address=address) -> np.ndarray:
                request = build_request(script, voices, tts_pb2.AUDIO_FORMAT_PCM_F32, seed=seed, fixed_frames=12)
                return np.frombuffer(synthesize(address, request, timeout=300).data, "<f4")

            with ThreadPoolExecutor(3) as pool:
                audio[name] = list(pool.map(run, (5, 6, 7)))
    assert "tensors in shared GPU memory" in (logs["shared"] / "llm.log").read_text()
    assert "tensors over the wire" in (logs["wire"] / "llm.log").read_text()
    # over the wire the llm pipelines two halves of its batch, each decoded by a graph at its own offset
    assert "render steps pipelined" in (logs["wire"] / "llm.log").read_text()
    assert "render steps pipelined" not in (logs["shared"] / "llm.log").read_text()
    for name in ("shared", "wire"):
        for a, b in zip(audio[name], audio["local"], strict=True):
            assert a.shape == b.shape == (12 * 3200,)
            assert np.abs(a - b).max() < TOLERANCE * np.abs(b).max(), name

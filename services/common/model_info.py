"""What a GPU service reports about the model it serves (DescribeModel)."""

from __future__ import annotations

from vibevoice.mesh.v1 import mesh_pb2


def model_info(engine, model_name: str) -> mesh_pb2.ModelInfo:
    return mesh_pb2.ModelInfo(
        model=model_name,
        random_weights=engine.ckpt.random_weights,
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        parameters=engine.parameter_count(),
        modules=list(engine.modules()),
    )

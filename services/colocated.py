"""The llm with the acoustic engine in its own process (`vvmesh serve llm --acoustic local`): one GPU, no hop.

The one place that builds both engines: the llm and the acoustic service meet only through `services.render`.
The acoustic engine loads first, so the llm plans its KV budget around the acoustic weights; the process also
serves Acoustic.EncodeVoice and Acoustic.StreamAudio, so the gateway finds the voice encoder and its streams' audio
at the llm's address.
"""

from __future__ import annotations

import asyncio

from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.acoustic.engine import AcousticEngine
from services.acoustic.server import Acoustic
from services.llm import server as llm_server
from services.render.audio_out import AudioRouter
from services.render.local import LocalLink


def main(argv: list[str] | None = None) -> None:
    args = llm_server.parser().parse_args(argv)
    ckpt, dtype = llm_server.load(args)
    graphs, compile_ = not args.no_cuda_graphs, not args.no_compile
    acoustic = AcousticEngine(ckpt, args.device, dtype, args.max_streams, graphs, compile_)
    engine = llm_server.build_engine(args, ckpt, dtype)

    audio_out = AudioRouter()  # keyed streams' frames, served by this process's StreamAudio
    encoder = {
        mesh_pb2.DESCRIPTOR.services_by_name["Acoustic"].full_name: lambda server: (
            mesh_pb2_grpc.add_AcousticServicer_to_server(Acoustic(acoustic, audio_out), server)
        )
    }
    asyncio.run(llm_server.serve(args, engine, LocalLink(acoustic, audio_out), encoder))


if __name__ == "__main__":
    main()
